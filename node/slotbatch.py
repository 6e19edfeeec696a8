"""The running batch on a preallocated SlotCache: what HFEngine drives for Llama-family models.

Same operations as node/scheduler.KVBatch (extend, decode, keep, merge), so the engine's loop does not
care which one it has; this one writes in place and can start rows from a cached prefix.
"""

from __future__ import annotations

import torch

from node.kvcache import SlotCache
from node.scheduler import KVBatch
from node.slotforward import SlotForward

__all__ = ["Batch", "SlotBatch"]


class SlotBatch:
    def __init__(self, forward: SlotForward) -> None:
        self._forward = forward
        self.cache = SlotCache(forward.kv_shape)

    @property
    def rows(self) -> int:
        return self.cache.rows

    @property
    def nbytes(self) -> int:
        return self.cache.nbytes

    def length(self, row: int) -> int:
        """Tokens held for `row`."""
        return int(self.cache.lengths[row])

    def start_rows(self, prefixes: list[tuple[list[torch.Tensor], list[torch.Tensor]] | None]) -> None:
        """New rows, one per entry, each starting from that cached prefix's keys/values (or empty)."""
        first = self.cache.rows
        self.cache.add_rows(len(prefixes))
        for row, prefix in enumerate(prefixes, start=first):
            if prefix is not None:
                self.cache.load(row, *prefix)

    def extend(self, tokens: list[list[int]]) -> torch.Tensor:
        """Append tokens[r] to row r (every row of the batch); float32 logits of each row's last one."""
        if self.cache.rows == 0:
            self.start_rows([None] * len(tokens))
        width = max(len(t) for t in tokens)
        ids = torch.zeros(len(tokens), width, dtype=torch.long)  # right padding: never attended
        for row, row_tokens in enumerate(tokens):
            ids[row, : len(row_tokens)] = torch.tensor(row_tokens)
        counts = None if all(len(t) == width for t in tokens) else [len(t) for t in tokens]
        return self._forward(self.cache, ids.to(self.cache.shape.device), 0, counts)

    def decode(self, tokens: list[int]) -> torch.Tensor:
        ids = torch.tensor(tokens, dtype=torch.long, device=self.cache.shape.device)[:, None]
        return self._forward(self.cache, ids, 0)

    def keep(self, rows: list[int]) -> None:
        self.cache.remove(rows)

    def merge(self, other: SlotBatch) -> None:
        self.cache.append(other.cache)

    def export(self, row: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return self.cache.export(row, self.length(row))


Batch = KVBatch | SlotBatch  # what HFEngine drives: the same operations either way
