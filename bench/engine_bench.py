"""Decode throughput of HFEngine (continuous batching) against plain `model.generate`.

Run: python bench/engine_bench.py [--model DIR] [--dtype auto] [--tokens 128] [--batches 1,4,16]

Every request is greedy and EOS is disabled (engine: empty eos set; generate: min_new_tokens), so each
row produces exactly --tokens tokens and the batch stays full. Each configuration runs once to warm
up (new batch shapes are slow the first time), then is timed. tok/s = generated tokens / wall time,
prefill included.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import threading
import time
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


def engine_run(engine: HFEngine, batch: int, tokens: int) -> float:
    """Submit `batch` requests at once; return generated tokens per second until all finish."""
    done = threading.Event()
    left = [batch]
    produced = [0]
    lock = threading.Lock()

    def sink(delta: Delta) -> None:
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
    return produced[0] / (time.perf_counter() - started)


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
    print("| batch | HFEngine tok/s | model.generate tok/s |")
    print("|---|---|---|")
    try:
        for batch in batches:
            engine_run(engine, batch, 8)  # warm up this batch shape
            ours = engine_run(engine, batch, args.tokens)
            generate_run(loaded, batch, 8)
            theirs = generate_run(loaded, batch, args.tokens)
            print(f"| {batch} | {ours:.1f} | {theirs:.1f} |", flush=True)
    finally:
        engine.stop()


if __name__ == "__main__":
    main()
