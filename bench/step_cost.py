"""The batch-1 decode step of the slot forward, bf16 prepacked, with and without fused projections.

Run: python bench/step_cost.py [--cache-dir DIR] [--threads 1,2] [--steps 40] [--rounds 3]

Two copies of the default model: one packed with each layer's q/k/v and gate/up as one product
(node.packing's FusedSlice, the engine's default), one with every linear packed alone. Rounds
alternate between them so both see the same moments of a shared machine; the logits of a 100-token
prefill must be identical (the table says so). Each thread count runs in a fresh process, so that
only one OpenMP team exists (bench/omp_team.py).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CASE = """
import sys
from pathlib import Path
import torch
from decode_step import step_ms
from node.kvcache import SlotCache
from node.loader import load_model
from node.packing import pack_linears
from node.slotforward import SlotForward

cache_dir, threads, steps, rounds = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
forwards = {}
for fuse in (False, True):
    model = load_model(None, cache_dir=cache_dir, dtype="bfloat16", progress=lambda _: None).model
    pack_linears(model, fuse=fuse)
    forwards[fuse] = SlotForward(model)
prompt = torch.randint(0, 1000, (1, 100))

times = {False: [], True: []}
for _ in range(rounds):
    for fuse in (False, True):
        times[fuse].append(step_ms(forwards[fuse], prompt, steps))
with torch.inference_mode():
    logits = []
    for fuse in (False, True):
        cache = SlotCache(forwards[fuse].kv_shape)
        cache.add_rows(1)
        logits.append(forwards[fuse](cache, prompt, 0))
same = bool(torch.equal(logits[0], logits[1]))
print(f"ROW {min(times[False]):.1f} {min(times[True]):.1f} {same}", flush=True)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "chatbus")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3, help="alternating timed runs of each; best kept")
    args = parser.parse_args()
    print(
        f"# batch-1 decode step, bf16 prepacked, 100-token context, {os.cpu_count()} cpus, best of {args.rounds}"
    )
    print("| threads | separate ms | fused ms | fused / separate | logits identical |\n|---|---|---|---|---|")
    for threads in [int(t) for t in args.threads.split(",")]:
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                CASE,
                str(args.cache_dir),
                str(threads),
                str(args.steps),
                str(args.rounds),
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'bench'}"},
            check=True,
        ).stdout
        line = next(x for x in out.splitlines() if x.startswith("ROW "))
        separate, fused, same = line.split()[1:]
        ratio = float(fused) / float(separate)
        print(
            f"| {threads} | {separate} | {fused} | {ratio:.2f} | {'yes' if same == 'True' else 'NO'} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
