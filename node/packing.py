"""bf16 Linear weights prepacked for oneDNN on CPU: the same products, in the layout its kernels want.

A plain bf16 `F.linear` on CPU reorders the weight on every call; oneDNN's prepacked layout skips
that, which makes a small-batch bf16 matmul 1.5–2.5× faster on a CPU with AVX512-BF16 (and the LM
head at 16 rows ~2×) with bit-identical outputs (docs/benchmarks.md, machine C). Modules are replaced
in place, so transformers' own forward (generate, embeddings) uses them too; the packed tensor
replaces the weight (no second copy) except where the weight is shared (a tied LM head).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["PackedLinear", "can_pack", "one_thread", "pack_linears"]


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch single-threaded for a moment, on a thread that is not the engine's.

    A parallel region on any other thread leaves a second OpenMP team for the life of the process;
    with more OpenMP threads than CPUs, libgomp throttles its spin-waits in every team, so each later
    decode step of the engine slows ~1.5× (25 → 38 ms at batch 1 on machine C, bench/omp_team.py).
    One thread runs no parallel region, so it leaves no team."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def can_pack() -> bool:
    """Is oneDNN's prepacked linear available in this torch build? (Single-threaded: even this tiny
    product would otherwise leave an OpenMP team on the caller's thread; see one_thread.)"""
    try:
        with one_thread():
            weight = torch.zeros(8, 8, dtype=torch.bfloat16)
            packed = torch.ops.mkldnn._reorder_linear_weight(weight)
            torch.ops.mkldnn._linear_pointwise(
                torch.zeros(1, 8, dtype=torch.bfloat16), packed, None, "none", [], ""
            )
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return bool(torch.backends.mkldnn.is_available())


class PackedLinear(torch.nn.Module):
    """A bf16 nn.Linear whose weight lives in oneDNN's packed layout (inference only)."""

    def __init__(self, linear: torch.nn.Linear, keep_weight: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())
        self.bias = linear.bias
        # Readers of `.weight` (shape, dtype, device) see the packed tensor unless it is shared.
        self.weight = linear.weight if keep_weight else self.packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def pack_linears(model: Any) -> int:
    """Replace every bf16 CPU nn.Linear of `model` by a PackedLinear; returns how many."""
    shared = {
        id(p) for m in model.modules() if not isinstance(m, torch.nn.Linear) for p in m.parameters(False)
    }
    swaps = []
    for parent in model.modules():
        for name, child in parent.named_children():
            weight = getattr(child, "weight", None)
            if type(child) is torch.nn.Linear and weight is not None:
                if weight.dtype == torch.bfloat16 and weight.device.type == "cpu":
                    swaps.append((parent, name, child))
    with one_thread():
        for parent, name, child in swaps:
            setattr(parent, name, PackedLinear(child, keep_weight=id(child.weight) in shared))
    return len(swaps)
