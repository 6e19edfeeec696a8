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

__all__ = ["FusedSlice", "PackedLinear", "can_pack", "one_thread", "pack_linears"]


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


class FusedSlice(torch.nn.Module):
    """One projection of a group (q/k/v, or an MLP's gate/up) whose weights are packed side by side
    into one PackedLinear: the group's first call on an input runs the one product, and the others
    on the same input take their columns of it. Callers stay unchanged (transformers' forward, the
    slot forward, a LoRA wrapper), and a batch-1 step makes 4 products a layer instead of 7."""

    def __init__(self, group: _Group, start: int, end: int, in_features: int) -> None:
        super().__init__()
        self._group = [group]  # a list: not a submodule (the group's weight is no parameter)
        self.start, self.end = start, end
        self.in_features, self.out_features = in_features, end - start
        self.weight = group.linear.weight  # readers of .weight (dtype, device) see the packed tensor
        self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._group[0].output(x)[..., self.start : self.end]


class _Group:
    """The shared product of one fused group, kept until each of its `parts` took its slice."""

    def __init__(self, linear: PackedLinear, parts: int) -> None:
        self.linear, self.parts = linear, parts
        self._input: torch.Tensor | None = None
        self._output: torch.Tensor | None = None
        self._served = 0

    def output(self, x: torch.Tensor) -> torch.Tensor:
        if x is not self._input or self._output is None:  # (inference tensors have no version)
            self._input, self._served = x, 0
            self._output = self.linear(x)
        out = self._output
        self._served += 1
        if self._served >= self.parts:  # every part has its slice: hold no activation
            self._input = self._output = None
        return out


_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def pack_linears(model: Any, *, fuse: bool = True) -> int:
    """Replace every bf16 CPU nn.Linear of `model` by a PackedLinear, fusing each module's q/k/v and
    gate/up into one (FusedSlice) unless `fuse` is False; returns how many linears were replaced.
    The fused products are bit-identical to the separate ones on oneDNN (tests/test_lora_engine.py)."""
    shared = {
        id(p) for m in model.modules() if not isinstance(m, torch.nn.Linear) for p in m.parameters(False)
    }

    def packable(child: Any) -> bool:
        weight = getattr(child, "weight", None)
        return (
            type(child) is torch.nn.Linear
            and weight is not None
            and weight.dtype == torch.bfloat16
            and weight.device.type == "cpu"
        )

    fusions: list[tuple[Any, tuple[str, ...], list[Any]]] = []
    for parent in model.modules():
        names: tuple[str, ...]
        for names in _GROUPS if fuse else ():
            parts: list[Any] = [getattr(parent, n, None) for n in names]
            if not all(packable(p) and id(p.weight) not in shared for p in parts):
                continue
            if len({p.in_features for p in parts}) == 1 and len({p.bias is None for p in parts}) == 1:
                fusions.append((parent, names, parts))
    swaps = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if packable(child)
    ]
    fused_ids = {id(p) for _, _, parts in fusions for p in parts}
    with one_thread():
        for parent, names, parts in fusions:
            _fuse(parent, names, parts)
        for parent, name, child in swaps:
            if id(child) not in fused_ids:
                setattr(parent, name, PackedLinear(child, keep_weight=id(child.weight) in shared))
    return len(swaps)


def _fuse(parent: Any, names: tuple[str, ...], parts: list[Any]) -> None:
    whole = torch.nn.Linear(
        parts[0].in_features, sum(p.out_features for p in parts), bias=parts[0].bias is not None
    )
    with torch.no_grad():
        whole.weight = torch.nn.Parameter(torch.cat([p.weight for p in parts]), requires_grad=False)
        if parts[0].bias is not None:
            whole.bias = torch.nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=False)
    group = _Group(PackedLinear(whole, keep_weight=False), len(parts))
    start = 0
    for name, part in zip(names, parts, strict=True):
        setattr(parent, name, FusedSlice(group, start, start + part.out_features, part.in_features))
        start += part.out_features
