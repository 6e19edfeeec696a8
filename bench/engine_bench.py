"""Decode throughput of HFEngine (continuous batching) against plain `model.generate`.

Run: python bench/engine_bench.py [--model DIR] [--dtype auto] [--tokens 128] [--batches 1,4,16] [--repeat 1]
[--no-prefix]

Every request is greedy and EOS is disabled (engine: empty eos set; generate: min_new_tokens), so each
row produces exactly --tokens tokens and the batch stays full. Each configuration runs once to warm
up (new batch shapes are slow the first time), then is timed --repeat times, engine and `generate`
alternating, best of each kept: on a shared machine both then see the same moments' load. `generate`
runs on the engine's worker thread between requests: torch used from a second thread of the process
would start a second OpenMP team that slows every later step of both. tok/s = generated tokens / wall time,
prefill included. HFEngine's TTFT p50 is over the burst of `batch` requests submitted at once (submit →
first delta). "others' CPU" is the share of the machine that other processes used during the timed
runs of the row (Linux /proc; "-" elsewhere), so a contended row shows.

The bandwidth ceiling is weight bytes / measured memory bandwidth (a read-only sum over 512 MiB, best
of five): the tok/s of a batch-1 decode that did nothing but read every weight once per token.
The prefix table times the first token of a ~2,000-token conversation's next turn, once with the
previous turn's KV in the prefix cache, against a fresh ~30-token prompt and against the same turn on
an engine without a prefix cache.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import re
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bus.schemas import ChatMessage, Constraint, SamplingParams
from node.engine import Delta, EngineRequest
from node.hf import HFEngine
from node.loader import LoadedModel, load_model
from node.prompts import encode

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


def engine_run(
    engine: HFEngine,
    batch: int,
    tokens: int,
    constraint: Constraint | None = None,
    ask: Callable[[int], str] | None = None,
    adapter: Callable[[int], str] | None = None,
) -> tuple[float, float]:
    """Submit `batch` requests at once (request i asks `ask(i)` of `adapter(i)`, "" the base, each under
    `constraint`); tokens per second until all finish, and TTFT p50 in ms."""
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
        question = ask(i) if ask is not None else f"{QUESTIONS[i % len(QUESTIONS)]} (#{i})"
        messages = [ChatMessage(role="user", content=question)]
        request = EngineRequest(
            request_id=f"b{batch}-{i}-{started}",
            messages=messages,
            params=params,
            constraint=constraint,
            adapter=adapter(i) if adapter is not None else "",
        )
        engine.submit(request, sink)
    done.wait()
    ttft = statistics.median(first - started for first in firsts.values())
    return produced[0] / (time.perf_counter() - started), 1000 * ttft


def bandwidth() -> float:
    """Bytes per second of a read-only pass over a tensor much larger than the caches."""
    data = torch.ones(512 * 2**20 // 4)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - started)
    return data.numel() * 4 / best


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def first_token_ms(
    engine: HFEngine, messages: list[ChatMessage], tag: str, tokens: int = 1
) -> tuple[float, str]:
    """Submit → first delta in ms, and the whole answer's text."""
    done = threading.Event()
    first: list[float] = []
    text: list[str] = []

    def sink(delta: Delta) -> None:
        first.append(first[0] if first else time.perf_counter())
        text.append(delta.text)
        if delta.finish_reason:
            done.set()

    started = time.perf_counter()
    params = SamplingParams(temperature=0, max_tokens=tokens)
    engine.submit(EngineRequest(request_id=f"{tag}-{started}", messages=messages, params=params), sink)
    done.wait()
    return 1000 * (first[0] - started), "".join(text)


def conversation(turns: int) -> list[ChatMessage]:
    """A chat history of `turns` question/answer pairs (~2,000 tokens at 20), ending in an answer."""
    out = []
    for i in range(turns):
        out.append(ChatMessage(role="user", content=f"{QUESTIONS[i % 4]} Tell me about part {i} in detail."))
        out.append(
            ChatMessage(role="assistant", content=f"Part {i}: " + "the keeper lit the lamp at dusk. " * 12)
        )
    return out


def prefix_rows(loaded: LoadedModel, history: list[ChatMessage]) -> list[tuple[str, float]]:
    """TTFT p50 (ms) of: a fresh short prompt, turn N cached, turn N with no prefix cache."""
    rows = []
    for cached in (True, False):
        engine = HFEngine(loaded, prefix_cache=cached)
        engine.start()
        try:
            fresh, turn = [], []
            for i in range(4):
                question = [ChatMessage(role="user", content=f"{QUESTIONS[i]} #{i}")]
                fresh.append(
                    first_token_ms(engine, question, "f", 2)[0]
                )  # 2: the first delta is not the last
                previous = [*history, ChatMessage(role="user", content=f"And then? ({i})")]
                _, reply = first_token_ms(engine, previous, "warm", 16)  # the previous turn, answered
                following = [
                    *previous,
                    ChatMessage(role="assistant", content=reply),
                    ChatMessage(role="user", content="Why?"),
                ]
                turn.append(first_token_ms(engine, following, "turn", 2)[0])
        finally:
            engine.stop()
        if cached:
            rows.append(("fresh ~30-token prompt", statistics.median(fresh[1:])))
        rows.append((f"turn N, prefix cache {'on' if cached else 'off'}", statistics.median(turn[1:])))
    return rows


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


def side_by_side(
    engine: HFEngine, loaded: LoadedModel, batch: int, tokens: int, repeat: int
) -> tuple[tuple[float, float], float, list[float]]:
    """Engine and `generate` (on the engine's thread), warmed up, then alternating `repeat` times:
    the best engine (tok/s, TTFT) and generate tok/s, and the others' CPU share of each timed run."""

    def generate() -> float:
        return engine._on_worker(lambda: generate_run(loaded, batch, tokens))  # the engine's thread

    engine_run(engine, batch, tokens)  # warm up every shape of the run
    generate()
    ours: list[tuple[float, float]] = []
    theirs: list[float] = []
    busy: list[float] = []
    for _ in range(max(1, repeat)):
        with others_cpu() as load:
            ours.append(engine_run(engine, batch, tokens))
        with others_cpu() as load_generate:
            theirs.append(generate())
        busy += load + load_generate
    return max(ours), max(theirs), busy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "chatbus")
    parser.add_argument("--repeat", type=int, default=1, help="timed runs of each, alternating; best kept")
    parser.add_argument("--no-prefix", action="store_true", help="skip the prefix-cache table")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of the engine's worker (default: torch's, every core)",
    )
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    loaded = load_model(args.model, cache_dir=args.cache_dir, dtype=args.dtype, progress=lambda _: None)
    weights = weight_bytes(loaded.model)  # before packing: the bytes a decode step reads
    engine = HFEngine(dataclasses.replace(loaded, eos_ids=[]), max_running=max(batches), threads=args.threads)
    engine.start()
    ours: dict[int, tuple[float, float]] = {}
    theirs: dict[int, float] = {}
    busy: dict[int, list[float]] = {}
    try:
        for batch in batches:
            ours[batch], theirs[batch], busy[batch] = side_by_side(
                engine, loaded, batch, args.tokens, args.repeat
            )
    finally:
        engine.stop()
    history = conversation(20)
    prefix = [] if args.no_prefix else prefix_rows(loaded, history)
    speed = bandwidth()
    ceiling = speed / weights

    flags = sorted(set(re.findall(r"\b(avx512_bf16|amx_bf16)\b", _cpuinfo())))
    print(
        f"# {loaded.name} on {loaded.device} {loaded.dtype}, torch threads {args.threads or torch.get_num_threads()}, "
        f"{os.cpu_count()} cpus ({', '.join(flags) or 'no avx512_bf16/amx_bf16'}), {args.tokens} new tokens per request"
    )
    print(
        f"# weights {weights / 1e6:.0f} MB, memory bandwidth {speed / 1e9:.1f} GB/s: "
        f"batch-1 ceiling {ceiling:.0f} tok/s"
    )
    print(
        "| batch | HFEngine tok/s | HFEngine TTFT p50 ms | model.generate tok/s | % of ceiling | others' CPU |"
    )
    print("|---|---|---|---|---|---|")
    for batch in batches:
        shown = "-" if any(math.isnan(x) for x in busy[batch]) else f"{max(max(busy[batch]), 0):.0%}"
        tok_s, ttft = ours[batch]
        share = f"{tok_s / ceiling:.0%}" if batch == 1 else "-"
        print(f"| {batch} | {tok_s:.1f} | {ttft:.0f} | {theirs[batch]:.1f} | {share} | {shown} |")
    if prefix:
        size = len(encode(loaded.tokenizer, history, None, ""))
        print(f"\n| first token, history of {size} tokens | TTFT p50 ms |\n|---|---|")
        for label, ms in prefix:
            print(f"| {label} | {ms:.0f} |", flush=True)


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


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
