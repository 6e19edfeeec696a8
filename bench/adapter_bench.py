"""Decode throughput of HFEngine with per-row LoRA adapters: all-base batches against mixed ones.

Run: python bench/adapter_bench.py [--dtype auto] [--rows 16] [--adapters 8] [--tokens 32] [--rank 8]

Rows of one batch, with N adapters loaded: all base (the LoRA path is skipped when no row uses one);
half base, half spread over the N adapters; every row on one of the N adapters (rows / N each); every
row on one adapter. Adapters are random PEFT LoRAs of rank --rank on every linear layer (the trainer's
default targets), made with peft in a child process. Each case runs once to warm up, then the cases
take turns for --rounds rounds (so a shared machine's drift hits each alike); the table shows the
median and best tok/s, and the median CPU time of this process per token (process_time: what the
work cost, less swayed than wall time by other processes on a shared machine). EOS is off, so every row makes exactly --tokens tokens; tok/s = generated tokens /
wall time, prefill included.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine_bench import engine_run  # bench/ is on the path: this script's own folder

from node.hf import HFEngine
from node.loader import load_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(model: Any, root: Path, count: int, rank: int) -> list[Path]:
    from peft import LoraConfig, get_peft_model

    dirs = []
    for i in range(count):
        torch.manual_seed(i)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False)
        get_peft_model(copy.deepcopy(model), config).save_pretrained(str(root / f"a{i}"))
        dirs.append(root / f"a{i}")
    return dirs


def run(engine: HFEngine, adapters: list[str], tokens: int) -> tuple[float, float]:
    """One request per entry of `adapters` ("" = the base), all at once: tokens per second of wall
    time, and CPU milliseconds of this process per token (what the work cost, whoever else ran)."""
    started, cpu = time.perf_counter(), time.process_time()
    tok_s, _ = engine_run(engine, len(adapters), tokens, adapter=lambda i: adapters[i])
    produced = tok_s * (time.perf_counter() - started)
    return tok_s, 1000 * (time.process_time() - cpu) / max(produced, 1.0)


def made_adapters(root: Path, count: int, rank: int, cache_dir: Path) -> list[Path]:
    """Random PEFT LoRAs under `root`, made in a child process: torch work on this process's main
    thread, while the engine's thread also runs torch, would slow every later step (node/hf.py)."""
    dirs = [root / f"a{i}" for i in range(count)]
    if not all((d / "adapter_config.json").is_file() for d in dirs):
        code = (
            "import sys; from pathlib import Path; sys.path[:0] = sys.argv[1:3]; "
            "from adapter_bench import make_adapters; from node.loader import load_model; "
            "m = load_model(None, cache_dir=Path(sys.argv[3]), dtype='float32', progress=lambda _: None).model; "
            "make_adapters(m, Path(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))"
        )
        here = Path(__file__).resolve().parent
        argv = [sys.executable, "-c", code, str(here), str(here.parent), str(cache_dir), str(root)]
        subprocess.run([*argv, str(count), str(rank)], check=True)
    return dirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--adapter-dir", type=Path, default=None, help="keep the made adapters here")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "chatbus")
    args = parser.parse_args()
    rows, count = args.rows, args.adapters

    with tempfile.TemporaryDirectory() as tmp:
        dirs = made_adapters(args.adapter_dir or Path(tmp), count, args.rank, args.cache_dir)
        loaded = load_model(None, cache_dir=args.cache_dir, dtype=args.dtype, progress=lambda _: None)
        engine = HFEngine(dataclasses.replace(loaded, eos_ids=[]), max_running=rows)
        engine.adapters.max_adapters = count
        engine.start()
        names = [f"a{i}" for i in range(count)]
        for name, folder in zip(names, dirs, strict=True):
            engine.adapters.load(folder, name)
        cases = {
            f"{rows} rows, all base ({count} adapters loaded, none used)": [""] * rows,
            f"{rows} rows: {rows // 2} base + {rows // 2} over {count} adapters": [
                "" if i % 2 == 0 else names[(i // 2) % count] for i in range(rows)
            ],
            f"{rows} rows over {count} adapters ({rows // count} each)": [
                names[i % count] for i in range(rows)
            ],
            f"{rows} rows, all on one adapter": [names[0]] * rows,
        }
        rates: dict[str, list[tuple[float, float]]] = {label: [] for label in cases}
        try:
            for adapters in cases.values():
                run(engine, adapters, args.tokens)  # warm up every shape
            for _ in range(args.rounds):  # interleaved: a shared machine's drift hits every case alike
                for label, adapters in cases.items():
                    rates[label].append(run(engine, adapters, args.tokens))
                    rate, cost = rates[label][-1]
                    print(
                        f"  {label}: {rate:.1f} tok/s, {cost:.1f} CPU ms/token", file=sys.stderr, flush=True
                    )
        finally:
            engine.stop()
    first = statistics.median(c for _, c in next(iter(rates.values())))
    print(
        f"# {loaded.name} on {loaded.device} {loaded.dtype}, torch threads {torch.get_num_threads()}, "
        f"{args.tokens} tokens a row, LoRA rank {args.rank} on {', '.join(TARGETS)}, {args.rounds} rounds"
    )
    print("| batch | tok/s median (best) | CPU ms/token median | CPU cost vs all base |")
    print("|---|---|---|---|")
    for label, got in rates.items():
        speed, cost = statistics.median(r for r, _ in got), statistics.median(c for _, c in got)
        print(f"| {label} | {speed:.1f} ({max(r for r, _ in got):.1f}) | {cost:.1f} | {cost / first:.2f}× |")


if __name__ == "__main__":
    main()
