"""A preallocated KV cache of per-row slots: rows write in place, join and leave without concatenation.

Layer l keeps keys and values in one tensor each of shape [slots, kv_heads, capacity, head_dim]. Row r
holds its tokens in columns [0, lengths[r]) of slot r, so a decode step writes one column per row in
place and attention reads the view [:rows, :, :longest]. Running rows always occupy slots 0..rows-1: a
row that leaves is replaced by the last one (one copy per finish, never per step). Capacity grows in
steps of `GROW` columns (a copy per growth, amortised over many steps); slots grow the same way.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["GROW", "SLOT_STEP", "KVShape", "SlotCache", "memory_budget", "token_bytes"]

GROW = 256  # columns added when a row outgrows the capacity
SLOT_STEP = 4  # slots are added this many at a time


@dataclass(frozen=True)
class KVShape:
    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    @property
    def token_bytes(self) -> int:
        """Bytes of K and V for one token over all layers."""
        itemsize = torch.empty(0, dtype=self.dtype).element_size()
        return 2 * self.layers * self.kv_heads * self.head_dim * itemsize


class SlotCache:
    """Keys/values of the running rows; `lengths[r]` tokens of row r are real, the rest is unused."""

    def __init__(self, shape: KVShape) -> None:
        self.shape = shape
        self.rows = 0
        self.lengths = torch.zeros(0, dtype=torch.long, device=shape.device)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._alloc(0, 0)

    @property
    def slots(self) -> int:
        return int(self.keys[0].shape[0])

    @property
    def capacity(self) -> int:
        return int(self.keys[0].shape[2])

    @property
    def nbytes(self) -> int:
        return self.slots * self.capacity * self.shape.token_bytes

    def _alloc(self, slots: int, capacity: int) -> None:
        s = self.shape
        size = (slots, s.kv_heads, capacity, s.head_dim)
        old_k, old_v = self.keys, self.values
        self.keys = [torch.zeros(size, dtype=s.dtype, device=s.device) for _ in range(s.layers)]
        self.values = [torch.zeros(size, dtype=s.dtype, device=s.device) for _ in range(s.layers)]
        lengths = torch.zeros(slots, dtype=torch.long, device=s.device)
        if old_k and self.rows:
            cols = int(self.lengths[: self.rows].max())
            for new, old in zip([*self.keys, *self.values], [*old_k, *old_v], strict=True):
                new[: self.rows, :, :cols] = old[: self.rows, :, :cols]
            lengths[: self.rows] = self.lengths[: self.rows]
        self.lengths = lengths

    def reserve(self, rows: int, columns: int) -> None:
        """Make room for `rows` rows of up to `columns` tokens (grows, never shrinks while in use)."""
        slots, capacity = self.slots, self.capacity
        if rows <= slots and columns <= capacity:
            return
        if rows > slots:  # a first allocation is exact; a running batch grows a few rows at a time
            slots = rows if slots == 0 else -(-rows // SLOT_STEP) * SLOT_STEP
        if columns > capacity:
            capacity = -(-columns // GROW) * GROW
        self._alloc(slots, capacity)

    def add_rows(self, count: int) -> range:
        """Append `count` empty rows; returns their slot indices."""
        self.reserve(self.rows + count, self.capacity)
        first = self.rows
        self.rows += count
        self.lengths[first : self.rows] = 0
        return range(first, self.rows)

    def remove(self, keep: list[int]) -> None:
        """Keep rows `keep` (ascending), compacted to slots 0..len(keep)-1 in that order."""
        if keep == list(range(self.rows)):
            return
        moved = [(new, old) for new, old in enumerate(keep) if new != old]
        if moved:  # only rows after the first gap move, each once
            device = self.shape.device
            src = torch.tensor([old for _, old in moved], dtype=torch.long, device=device)
            dst = torch.tensor([new for new, _ in moved], dtype=torch.long, device=device)
            cols = int(self.lengths[src].max())
            for tensor in [*self.keys, *self.values]:
                tensor[:, :, :cols].index_copy_(0, dst, tensor[:, :, :cols].index_select(0, src))
            self.lengths[dst] = self.lengths[src]
        self.rows = len(keep)
        if self.rows == 0:
            self.release()

    def release(self) -> None:
        """Give the memory back when nothing runs (a long prompt must not pin its capacity)."""
        self.rows = 0
        self._alloc(0, 0)

    def load(self, row: int, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Copy a prefix ([kv_heads, n, head_dim] per layer) into the start of `row`."""
        n = int(keys[0].shape[1])
        self.reserve(self.rows, n)
        for layer, (k, v) in enumerate(zip(keys, values, strict=True)):
            self.keys[layer][row, :, :n] = k
            self.values[layer][row, :, :n] = v
        self.lengths[row] = n

    def export(self, row: int, n: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Views of the first `n` tokens of `row` ([kv_heads, n, head_dim] per layer): copy to keep."""
        return [k[row, :, :n] for k in self.keys], [v[row, :, :n] for v in self.values]

    def append(self, other: SlotCache) -> None:
        """Add `other`'s rows after ours (a copy, once per join; an empty cache adopts `other`'s)."""
        if other.rows == 0:
            return
        if self.rows == 0:
            self.keys, self.values, self.lengths, self.rows = (
                other.keys,
                other.values,
                other.lengths,
                other.rows,
            )
            return
        cols = int(other.lengths[: other.rows].max())
        first = self.rows
        self.reserve(first + other.rows, cols)
        self.rows += other.rows
        for mine, theirs in zip([*self.keys, *self.values], [*other.keys, *other.values], strict=True):
            mine[first : self.rows, :, :cols] = theirs[: other.rows, :, :cols]
        self.lengths[first : self.rows] = other.lengths[: other.rows]


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def memory_budget(spec: str | float | int | None, total: int | None = None) -> int:
    """Bytes for the KV cache from '2GiB', '512MB', a fraction of RAM like '0.25', or 'auto' (a quarter).

    `total` is the memory a fraction is taken of (default: this machine's physical RAM).
    """
    if spec is None or spec == "auto":
        spec = 0.25
    if isinstance(spec, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", spec)
        if match is None or match.group(2).lower() not in _UNITS:
            raise ValueError(f"bad memory size {spec!r}: use e.g. 2GiB, 512MB or a fraction of RAM like 0.25")
        number, unit = float(match.group(1)), match.group(2).lower()
        if unit or number > 1:
            return int(number * _UNITS[unit])
        spec = number
    if 0 < spec <= 1:
        ram = total if total is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return int(spec * ram)
    return int(spec)


def token_bytes(model: Any) -> int:
    """KV bytes per token of a transformers decoder: keys and values of every layer."""
    config = getattr(model.config, "get_text_config", lambda: model.config)()
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    itemsize = model.get_input_embeddings().weight.element_size()
    return 2 * int(config.num_hidden_layers) * kv_heads * head_dim * itemsize
