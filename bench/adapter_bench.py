"""Decode throughput of HFEngine with per-row LoRA adapters: all-base batches against mixed ones.

Run: python bench/adapter_bench.py [--dtype auto] [--rows 16] [--adapters 8] [--tokens 64] [--rank 8]

Rows of one batch: all base on an engine that never loaded an adapter; all base with N adapters
loaded (the LoRA path is skipped when no row uses one); half base, half spread over the N adapters;
every row on one of the N adapters (rows / N each); every row on one adapter. Adapters are random
PEFT LoRAs of rank --rank on every linear layer (the trainer's default targets), made with peft on the
engine's worker thread (torch from a second thread would slow every later step, node/hf.py). Each
configuration runs once to warm up, then --repeat times; the table shows the best and the mean. EOS is
off, so every row makes exactly --tokens tokens; tok/s = generated tokens / wall time, prefill included.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bus.schemas import ChatMessage, SamplingParams
from node.engine import Delta, EngineRequest
from node.hf import HFEngine
from node.loader import load_model

QUESTIONS = [
    "Write a long story about a lighthouse keeper.",
    "Explain how a steam engine works, step by step.",
    "Describe the history of Paris.",
    "List ideas for a birthday party and explain each one.",
]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(model: Any, root: Path, count: int, rank: int) -> list[Path]:
    from peft import LoraConfig, get_peft_model

    dirs = []
    for i in range(count):
        torch.manual_seed(i)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False)
        get_peft_model(copy.deepcopy(model), config).save_pretrained(root / f"a{i}")
        dirs.append(root / f"a{i}")
    return dirs


def run(engine: HFEngine, adapters: list[str], tokens: int) -> float:
    """One request per entry of `adapters` ("" = the base), all at once; tokens per second."""
    done, lock = threading.Event(), threading.Lock()
    left, produced = [len(adapters)], [0]

    def sink(delta: Delta) -> None:
        if delta.finish_reason:
            with lock:
                produced[0] += delta.completion_tokens
                left[0] -= 1
                if left[0] == 0:
                    done.set()

    params = SamplingParams(temperature=0, max_tokens=tokens)
    started = time.perf_counter()
    for i, adapter in enumerate(adapters):
        messages = [ChatMessage(role="user", content=f"{QUESTIONS[i % len(QUESTIONS)]} (#{i})")]
        engine.submit(
            EngineRequest(f"r{i}-{started}", messages=messages, params=params, adapter=adapter), sink
        )
    done.wait()
    return produced[0] / (time.perf_counter() - started)


def measure(engine: HFEngine, adapters: list[str], tokens: int, repeat: int) -> tuple[float, float]:
    run(engine, adapters, tokens)  # warm up this shape
    rates = [run(engine, adapters, tokens) for _ in range(repeat)]
    return max(rates), statistics.mean(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "chatbus")
    args = parser.parse_args()
    rows, count = args.rows, args.adapters

    loaded = load_model(None, cache_dir=args.cache_dir, dtype=args.dtype, progress=lambda _: None)
    engine = HFEngine(dataclasses.replace(loaded, eos_ids=[]), max_running=rows)
    engine.adapters.max_adapters = count
    engine.start()
    names = [f"a{i}" for i in range(count)]
    cases = {
        f"{rows} rows, base only, no adapter loaded": [""] * rows,
        f"{rows} rows, base only, {count} adapters loaded": [""] * rows,
        f"{rows} rows: {rows // 2} base + {rows // 2} over {count} adapters": [
            "" if i % 2 == 0 else names[(i // 2) % count] for i in range(rows)
        ],
        f"{rows} rows over {count} adapters ({rows // count} each)": [names[i % count] for i in range(rows)],
        f"{rows} rows, all on one adapter": [names[0]] * rows,
    }
    results: dict[str, tuple[float, float]] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for label, adapters in cases.items():
                if "no adapter loaded" not in label and not engine.adapters.names():
                    dirs = engine._on_worker(lambda: make_adapters(loaded.model, Path(tmp), count, args.rank))
                    for name, folder in zip(names, dirs, strict=True):
                        engine.adapters.load(folder, name)
                results[label] = measure(engine, adapters, args.tokens, args.repeat)
                print(f"  {label}: {results[label][0]:.1f} tok/s", file=sys.stderr, flush=True)
    finally:
        engine.stop()
    first = next(iter(results.values()))[0]
    print(
        f"# {loaded.name} on {loaded.device} {loaded.dtype}, torch threads {torch.get_num_threads()}, "
        f"{args.tokens} tokens a row, LoRA rank {args.rank} on {', '.join(TARGETS)}"
    )
    print(f"| batch | best tok/s | mean tok/s (of {args.repeat}) | vs base only |")
    print("|---|---|---|---|")
    for label, (best, mean) in results.items():
        print(f"| {label} | {best:.1f} | {mean:.1f} | {best / first:.2f}× |")


if __name__ == "__main__":
    main()
