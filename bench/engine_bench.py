"""Decode throughput of HFEngine (continuous batching) against plain `model.generate`.

Run: python bench/engine_bench.py [--model DIR] [--dtype auto] [--tokens 128] [--batches 1,4,16]

Every request is greedy and EOS is disabled (engine: empty eos set; generate: min_new_tokens), so each
row produces exactly --tokens tokens and the batch stays full. Each configuration runs once to warm
up (new batch shapes are slow the first time), then is timed. tok/s = generated tokens / wall time,
prefill included. HFEngine's TTFT p50 is over the burst of `batch` requests submitted at once (submit →
first delta). "others' CPU" is the share of the machine that other processes used during the timed
runs of the row (Linux /proc; "-" elsewhere), so a contended row shows.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bus.schemas import ChatMessage, SamplingParams
from node.engine import Delta, EngineRequest
from node.hf import HFEngine
from node.loader import LoadedModel, load_model

QUESTIONS = [
    "Write a long story about a lighthouse keeper.",
    "Explain how a steam engine works, step by step.",
    "Describe the history of Paris.",
    "List ideas for a birthday party and explain each one.",
]


def busy_seconds() -> tuple[float, float]:
    """CPU seconds (whole machine busy, this process) since boot; nan where /proc is missing."""
    try:
        ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        mine = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, ValueError):
        return math.nan, math.nan
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(ticks) - ticks[3] - ticks[4]) / hz, (int(mine[11]) + int(mine[12])) / hz


def engine_run(engine: HFEngine, batch: int, tokens: int) -> tuple[float, float]:
    """Submit `batch` requests at once; tokens per second until all finish, and TTFT p50 in ms."""
    done = threading.Event()
    left = [batch]
    produced = [0]
    firsts: dict[str, float] = {}
    lock = threading.Lock()

    def sink(delta: Delta) -> None:
        firsts.setdefault(delta.request_id, time.perf_counter())
        if delta.finish_reason:
            with lock:
                produced[0] += delta.completion_tokens
                left[0] -= 1
                if left[0] == 0:
                    done.set()

    params = SamplingParams(temperature=0, max_tokens=tokens)
    started = time.perf_counter()
    for i in range(batch):
        question = QUESTIONS[i % len(QUESTIONS)]
        messages = [ChatMessage(role="user", content=f"{question} (#{i})")]
        engine.submit(
            EngineRequest(request_id=f"b{batch}-{i}-{started}", messages=messages, params=params), sink
        )
    done.wait()
    ttft = statistics.median(first - started for first in firsts.values())
    return produced[0] / (time.perf_counter() - started), 1000 * ttft


def generate_run(loaded: LoadedModel, batch: int, tokens: int) -> float:
    tok = loaded.tokenizer
    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} (#{i})"}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for i in range(batch)
    ]
    inputs = tok(texts, padding=True, padding_side="left", return_tensors="pt", add_special_tokens=False)
    inputs = inputs.to(loaded.device)
    started = time.perf_counter()
    with torch.inference_mode():
        out = loaded.model.generate(
            **inputs,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
    produced = (out.shape[1] - inputs["input_ids"].shape[1]) * batch
    return produced / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "chatbus")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    loaded = load_model(args.model, cache_dir=args.cache_dir, dtype=args.dtype, progress=lambda _: None)
    engine = HFEngine(dataclasses.replace(loaded, eos_ids=[]), max_running=max(batches))
    engine.start()
    print(
        f"# {loaded.name} on {loaded.device} {loaded.dtype}, torch threads {torch.get_num_threads()}, "
        f"{os.cpu_count()} cpus, {args.tokens} new tokens per request"
    )
    print("| batch | HFEngine tok/s | HFEngine TTFT p50 ms | model.generate tok/s | others' CPU |")
    print("|---|---|---|---|---|")
    # The engine first, then `generate` once the engine's thread is gone: with torch busy from two
    # threads of one process (two OpenMP teams on 2 cores) both run at half speed.
    ours, theirs, busy = {}, {}, {}
    try:
        for batch in batches:
            engine_run(engine, batch, args.tokens)  # warm up every shape of the run
            with others_cpu() as load:
                ours[batch] = engine_run(engine, batch, args.tokens)
            busy[batch] = load
    finally:
        engine.stop()
    for batch in batches:
        generate_run(loaded, batch, args.tokens)
        with others_cpu() as load:
            theirs[batch] = generate_run(loaded, batch, args.tokens)
        busy[batch] += load
        shown = "-" if any(math.isnan(x) for x in busy[batch]) else f"{max(max(busy[batch]), 0):.0%}"
        tok_s, ttft = ours[batch]
        print(f"| {batch} | {tok_s:.1f} | {ttft:.0f} | {theirs[batch]:.1f} | {shown} |", flush=True)


@contextlib.contextmanager
def others_cpu() -> Iterator[list[float]]:
    """Yields a list that, on exit, holds the share of the machine other processes used meanwhile."""
    share: list[float] = []
    machine, mine = busy_seconds()
    wall = time.perf_counter()
    yield share
    machine_after, mine_after = busy_seconds()
    share.append(((machine_after - machine) - (mine_after - mine)) / ((time.perf_counter() - wall) * CORES))


CORES = os.cpu_count() or 1


if __name__ == "__main__":
    main()
