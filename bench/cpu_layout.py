"""Which float layout and dtype decode fastest on this CPU: one Linear, then a whole decode step.

Run:  python bench/cpu_layout.py [--cache-dir DIR] [--rows 1,4,16]

Prints two tables. First, the time of one `F.linear` for the default model's shapes (an MLP projection
and the LM head) with the weight in PyTorch's layout ([out, in]), stored input-major (a transposed
view of a contiguous [in, out], what node/loader.py does for float32 on CPU), and in bf16. Second, a
decode step of the real model through node/scheduler.KVBatch (30 layers, logits of the last position)
for float32 in both layouts and bf16, plus the prefill of 16 chat prompts. All in this one thread, so
no second OpenMP team skews it (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.loader import load_model
from node.scheduler import KVBatch

PROMPT = "Write a long story about a lighthouse keeper."


def micros(call: Callable[[], object], repeat: int) -> float:
    for _ in range(max(3, repeat // 10)):
        call()
    started = time.perf_counter()
    for _ in range(repeat):
        call()
    return (time.perf_counter() - started) / repeat * 1e6


def linear_table(rows: list[int]) -> None:
    print("| Linear (out × in), µs | layout | " + " | ".join(f"{r} rows" for r in rows) + " |")
    print("|---|---|" + "---|" * len(rows))
    for out_f, in_f in ((1536, 576), (49152, 576)):
        weight = torch.randn(out_f, in_f)
        variants = {
            "float32 [out, in]": weight,
            "float32 input-major": weight.t().contiguous().t(),
            "bf16 [out, in]": weight.bfloat16(),
        }
        repeat = 20 if out_f > 10_000 else 300
        for name, w in variants.items():
            cells = []
            for r in rows:
                x = torch.randn(r, in_f, dtype=w.dtype)
                cells.append(f"{micros(lambda x=x, w=w: torch.nn.functional.linear(x, w), repeat):.0f}")
            print(f"| {out_f} × {in_f} | {name} | " + " | ".join(cells) + " |", flush=True)


def step_table(cache_dir: Path, rows: list[int]) -> None:
    print("\n| decode step, ms | " + " | ".join(f"{r} rows" for r in rows) + " | prefill 16 prompts, ms |")
    print("|---|" + "---|" * len(rows) + "---|")
    for dtype, input_major in (("float32", False), ("float32", True), ("bfloat16", False)):
        loaded = load_model(None, cache_dir=cache_dir, dtype=dtype, progress=lambda _: None)
        model = loaded.model
        for module in model.modules():  # the loader stores float32 input-major; undo or keep it
            if type(module) is torch.nn.Linear:
                w = module.weight.data
                module.weight.data = w.t().contiguous().t() if input_major else w.contiguous()
        ids = loaded.tokenizer.apply_chat_template(
            [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=True
        )
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        cells, prefill = [], 0.0
        with torch.inference_mode():
            for r in [*rows, 16]:
                kv = KVBatch(torch.device("cpu"))
                started = time.perf_counter()
                nxt = kv.forward(model, torch.tensor([ids] * r)).argmax(-1, keepdim=True)
                took = time.perf_counter() - started
                for _ in range(5):  # warm-up
                    nxt = kv.forward(model, nxt).argmax(-1, keepdim=True)
                started = time.perf_counter()
                for _ in range(30):
                    nxt = kv.forward(model, nxt).argmax(-1, keepdim=True)
                if len(cells) < len(rows):
                    cells.append(f"{(time.perf_counter() - started) / 30 * 1000:.0f}")
                else:
                    prefill = took
        name = f"{dtype} {'input-major' if input_major else '[out, in]'}"
        print(f"| {name} | " + " | ".join(cells) + f" | {prefill * 1000:.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "chatbus")
    parser.add_argument("--rows", default="1,4,16")
    args = parser.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    print(
        f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}"
    )
    linear_table(rows)
    step_table(args.cache_dir, rows)


if __name__ == "__main__":
    main()
