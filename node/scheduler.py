"""KV-cache bookkeeping for continuous batching: one left-padded batch that rows join and leave.

New sequences are prefilled in a group of their own (one left-padded forward, see node/hf.py) and the
group is then merged into the running batch by left-padding the shorter cache with zeros along the
sequence dim. The attention mask hides pad columns and position ids are counted from the mask, so
padding never shifts rotary positions. Decode steps never put a query on a pad position; a prefill
group does (a short row's left pads). Those fully masked query rows stay finite with torch's SDPA (no
NaN reaches the cache, checked with torch 2.13 on CPU; transformers' own left-padded `generate` relies
on the same, its `allow_torch_fix` mask workaround is now a no-op) and their outputs are never read.
Rows leave by index_select on the batch dim; columns that became padding for every row are trimmed.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from transformers import DynamicCache

__all__ = ["KVBatch"]


@functools.cache
def _cache_argument_of(forward: Any) -> str:
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def _cache_argument(model: Any) -> str:
    """transformers 5.23+ names the KV cache `cache` (`past_key_values` warns, and goes in 5.40)."""
    return _cache_argument_of(type(model).forward)


class KVBatch:
    """A batch of sequences sharing one DynamicCache of shape [rows, heads, cols, head_dim] per layer.

    `mask[r, c]` is 1 where column c holds a real token of row r. Position ids come from the mask
    (a row's next position is its count of real tokens), so padding never shifts rotary positions.
    """

    def __init__(self, device: str | torch.device, model: Any = None) -> None:
        self.device = torch.device(device)
        self.model = model  # what extend/decode run (forward takes it as an argument)
        # No config: every layer is a plain DynamicLayer, whose tensors we may pad and slice freely.
        self.cache: DynamicCache = DynamicCache()
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])

    @property
    def cols(self) -> int:
        return int(self.mask.shape[1])

    def forward(
        self, model: Any, input_ids: torch.Tensor, new_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Feed `input_ids` [rows, T] and return float32 logits of each row's last column.

        `new_mask` [rows, T] marks real tokens (1) and left padding (0); without it all are real.
        The last column must be a real token in every row.
        """
        rows, new = input_ids.shape
        if self.rows == 0:
            self.mask = torch.zeros(rows, 0, dtype=torch.long, device=self.device)
        if new_mask is None:
            new_mask = torch.ones(rows, new, dtype=torch.long, device=self.device)
        full = torch.cat([self.mask, new_mask.to(self.device, torch.long)], dim=1)
        positions = (full.cumsum(-1) - 1).clamp(min=0)[:, -new:]  # a pad's position is never used
        out = model(
            input_ids=input_ids.to(self.device),
            attention_mask=full,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{_cache_argument(model): self.cache},
        )
        self.cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        self.mask = full
        return out.logits[:, -1, :].float()

    @property
    def nbytes(self) -> int:
        layers: list[Any] = list(self.cache.layers)
        return sum(
            t.numel() * t.element_size() for lay in layers for t in (lay.keys, lay.values) if t is not None
        )

    def extend(self, tokens: list[list[int]]) -> torch.Tensor:
        """Append tokens[r] to row r: a new group left-padded, or the next chunk of one row."""
        width = max(len(t) for t in tokens)
        ids = torch.zeros(len(tokens), width, dtype=torch.long)  # pad id 0: masked, never attended
        mask = torch.zeros(len(tokens), width, dtype=torch.long)
        for row, row_tokens in enumerate(tokens):
            ids[row, width - len(row_tokens) :] = torch.tensor(row_tokens)
            mask[row, width - len(row_tokens) :] = 1
        return self.forward(self.model, ids.to(self.device), mask)

    def decode(self, tokens: list[int]) -> torch.Tensor:
        return self.forward(self.model, torch.tensor([[t] for t in tokens], device=self.device))

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (in this order) and drop columns no remaining row uses."""
        if rows == list(range(self.rows)):
            return
        if not rows:
            self.cache = DynamicCache()
            self.mask = self.mask[:0, :0]
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        mask = self.mask.index_select(0, index)
        used = mask.any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else mask.shape[1]
        self.mask = mask[:, start:]
        layers: list[Any] = list(self.cache.layers)
        for layer in layers:
            if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
                continue
            layer.keys = layer.keys.index_select(0, index.to(layer.keys.device))[:, :, start:, :]
            layer.values = layer.values.index_select(0, index.to(layer.values.device))[:, :, start:, :]

    def merge(self, other: KVBatch) -> None:
        """Append `other`'s rows after ours, left-padding whichever cache is shorter."""
        if other.rows == 0:
            return
        if self.rows == 0:
            self.cache, self.mask = other.cache, other.mask
            return
        cols = max(self.cols, other.cols)
        self.mask = torch.cat([_left_pad(self.mask, cols), _left_pad(other.mask, cols)], dim=0)
        pairs: list[tuple[Any, Any]] = list(zip(self.cache.layers, other.cache.layers, strict=True))
        for mine, theirs in pairs:
            mine.keys = torch.cat([_left_pad(mine.keys, cols), _left_pad(theirs.keys, cols)], dim=0)
            mine.values = torch.cat([_left_pad(mine.values, cols), _left_pad(theirs.values, cols)], dim=0)


def _left_pad(tensor: torch.Tensor, cols: int) -> torch.Tensor:
    """Zero-pad the sequence dim (dim 1 of a mask, dim 2 of a KV tensor) on the left up to `cols`."""
    dim = 1 if tensor.dim() == 2 else 2
    missing = cols - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
