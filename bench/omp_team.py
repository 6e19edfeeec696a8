"""What a second OpenMP team costs the engine: the batch-1 decode step where and after what it runs.

Run: python bench/omp_team.py [--cache-dir DIR] [--steps 50]

Each case is a fresh process (an OpenMP team lives as long as its thread): it loads the default model
in bf16 with its linears prepacked (as the engine runs it), optionally does something first on the
main thread, then times `--steps` batch-1 decode steps of node.slotforward on a 100-token context,
on the main thread or on a new thread. libgomp throttles the spin-waits of every team once the
process has more OpenMP threads than CPUs, which is what the second team does (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CASE = """
import sys, threading
from pathlib import Path
import torch
from decode_step import step_ms
from node.loader import load_model
from node.packing import can_pack, pack_linears
from node.slotforward import SlotForward

cache_dir, first, where, steps = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
model = load_model(None, cache_dir=cache_dir, dtype="bfloat16", progress=lambda _: None).model
def probe():  # what can_pack() ran before it was made single-threaded: one tiny oneDNN product
    packed = torch.ops.mkldnn._reorder_linear_weight(torch.zeros(8, 8, dtype=torch.bfloat16))
    torch.ops.mkldnn._linear_pointwise(torch.zeros(1, 8, dtype=torch.bfloat16), packed, None, "none", [], "")

if first == "probe":  # before packing, as the engine did
    probe()
elif first == "can_pack":  # now: the same product under node.packing.one_thread
    assert can_pack()
pack_linears(model)
forward = SlotForward(model)

def report():
    print(f"MS {step_ms(forward, torch.randint(0, 1000, (1, 100)), steps, warm=10):.1f}", flush=True)

if first == "forward":
    report()
if where == "main":
    report()
else:
    worker = threading.Thread(target=report)
    worker.start()
    worker.join()
"""

CASES = [
    ("the main thread, nothing else used torch", "nothing", "main", {}),
    ("a new thread, nothing else used torch", "nothing", "thread", {}),
    ("a new thread, after the main thread decoded", "forward", "thread", {}),
    (
        "a new thread, after the old can_pack() on the main thread (its 8x8 product, 2 threads)",
        "probe",
        "thread",
        {},
    ),
    ("a new thread, after can_pack() as it is now (single-threaded)", "can_pack", "thread", {}),
    ("the main thread, OMP_WAIT_POLICY=PASSIVE", "nothing", "main", {"OMP_WAIT_POLICY": "PASSIVE"}),
    (
        "a new thread, after the old can_pack(), GOMP_SPINCOUNT=100000",
        "probe",
        "thread",
        {"GOMP_SPINCOUNT": "100000"},
    ),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "chatbus")
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    print(f"# batch-1 decode step, bf16 prepacked, {os.cpu_count()} cpus, {args.steps} steps a case")
    print("| where the steps run | ms a step |\n|---|---|")
    for label, first, where, env in CASES:
        out = subprocess.run(
            [sys.executable, "-c", CASE, str(args.cache_dir), first, where, str(args.steps)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**os.environ, **env, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'bench'}"},
            check=True,
        ).stdout
        shown = " / ".join(line.split()[1] for line in out.splitlines() if line.startswith("MS "))
        print(f"| {label} | {shown} |", flush=True)


if __name__ == "__main__":
    main()
