"""Decode throughput of HFEngine with and without a JSON-schema constraint: what the grammar mask costs.

Run: python bench/grammar_bench.py [--model DIR] [--dtype auto] [--tokens 64] [--batches 1,16] [--repeats 2]

Every request is greedy and EOS is disabled, so each row produces exactly --tokens tokens (a row whose
JSON is complete goes on choosing among the tokens its grammar still allows: the mask is still computed
every step). Each configuration runs once to warm up, then `--repeats` times alternating free and
constrained, so a change in machine load hits both. tok/s = generated tokens / wall time, prefill
included.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine_bench import engine_run  # bench/ is on the path: this script's own folder

from bus.constraints import json_schema_constraint
from bus.schemas import Constraint
from node.hf import HFEngine
from node.loader import load_model

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
        "genre": {"enum": ["drama", "comedy", "horror", "documentary"]},
        "cast": {"type": "array", "items": {"type": "object", "properties": {"name": {"type": "string"}}}},
        "summary": {"type": "string"},
    },
    "required": ["title", "year", "genre", "cast", "summary"],
}
QUESTION = "Describe a film as JSON with a long summary (#{i})."


def run(engine: HFEngine, batch: int, tokens: int, constraint: Constraint | None) -> float:
    """Tokens per second of `batch` requests at once (engine_bench's closed loop, with our question)."""
    return engine_run(engine, batch, tokens, constraint, ask=lambda i: QUESTION.format(i=i))[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "chatbus")
    args = parser.parse_args()
    loaded = load_model(args.model, cache_dir=args.cache_dir, dtype=args.dtype, progress=lambda _: None)
    batches = [int(b) for b in args.batches.split(",")]
    engine = HFEngine(dataclasses.replace(loaded, eos_ids=[]), max_running=max(batches))
    engine.start()
    constraint = json_schema_constraint(SCHEMA)
    print(
        f"# {loaded.name} on {loaded.device} {loaded.dtype}, torch threads {torch.get_num_threads()}, "
        f"{os.cpu_count()} cpus, {args.tokens} new tokens per request, schema {len(json.dumps(SCHEMA))} chars"
    )
    print("| batch | free tok/s | JSON-schema tok/s | constrained / free |")
    print("|---|---|---|---|")
    try:
        for batch in batches:
            run(engine, batch, args.tokens, None)  # warm up the shapes and the compiled grammar
            run(engine, batch, args.tokens, constraint)
            free, constrained = [], []
            for _ in range(args.repeats):
                free.append(run(engine, batch, args.tokens, None))
                constrained.append(run(engine, batch, args.tokens, constraint))
            f, c = statistics.median(free), statistics.median(constrained)
            print(f"| {batch} | {f:.1f} | {c:.1f} | {c / f:.2f} |", flush=True)
    finally:
        engine.stop()


if __name__ == "__main__":
    main()
