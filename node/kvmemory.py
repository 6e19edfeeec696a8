"""The engine's KV memory: which batch a model gets, the byte budget, and the prefix cache.

Running rows reserve their prompt plus max_tokens (their rectangle in the slot cache may grow that
far); the prefix cache lives in whatever the rows leave free and gives way first, least recently used
first. Everything here runs on the engine's worker thread except `check` (the caller's, at submit)
and reading `advertised` (a list replaced whole, never mutated).
"""

from __future__ import annotations

from typing import Any

import torch

from bus.errors import NodeBusy
from bus.prefixes import prefix_hashes
from bus.schemas import ChatMessage
from node.kvcache import GROW, SLOT_STEP, memory_budget, token_bytes
from node.loader import LoadedModel
from node.packing import can_pack, pack_linears
from node.prefix_cache import PrefixCache
from node.scheduler import KVBatch
from node.sequence import Seq
from node.slotbatch import Batch, SlotBatch
from node.slotforward import SlotForward, supported

__all__ = ["KVMemory"]

_ADVERTISED = 64  # prefix hashes in EngineStats.cached_prefixes


class KVMemory:
    def __init__(self, loaded: LoadedModel, budget: int | str | None, prefix_cache: bool) -> None:
        self._m = loaded
        self.budget = memory_budget(budget)
        self.token_bytes = token_bytes(loaded.model)
        self._forward = _fast_path(loaded.model)
        self.prefixes = PrefixCache(self.budget if prefix_cache and self._forward else 0)
        self.advertised: list[int] = []  # the prefix cache's chat hashes, most recent first
        # For the node's metrics (read from other threads: plain numbers, replaced whole):
        self.usage = 0.0  # the running batch's KV bytes over the budget, after the last step
        self.queried_tokens = 0  # prompt tokens looked up in the prefix cache
        self.hit_tokens = 0  # of those, tokens that came from it

    def new_batch(self) -> Batch:
        if self._forward is not None:
            return SlotBatch(self._forward)
        return KVBatch(self._m.device, self._m.model)

    def check(self, columns: int) -> None:
        """Reject at once a request whose `columns` (prompt + max_new) could never fit."""
        need = (columns + GROW) * self.token_bytes
        if need > self.budget:
            raise NodeBusy(
                f"the request needs {need >> 20} MiB of KV cache, this node has {self.budget >> 20} MiB"
            )

    def lookup(self, seq: Seq) -> None:
        """Find the longest cached prefix of `seq`'s prompt (once)."""
        if seq.prefix is None and seq.cached == 0 and self.prefixes.budget:
            hit = self.prefixes.lookup(seq.prompt, _salt(seq))
            if hit is not None:
                seq.cached, seq.prefix = hit

    def admit(self, running: list[Seq], joining: list[Seq]) -> bool:
        """May `joining` start now? The prefix cache shrinks to make room; running rows never do.
        A group of one with nothing running always may (`check` made sure it fits alone)."""
        rows = [*running, *joining]
        slots = -(-len(rows) // SLOT_STEP) * SLOT_STEP
        columns = max(s.reserve for s in rows) + GROW
        own = len(joining) * (max(s.reserve for s in joining) + GROW)  # their prefill batch
        need = (slots * columns + own) * self.token_bytes
        if need > self.budget and len(rows) > 1:
            return False
        self.prefixes.shrink_to(self.budget - need)
        return True

    def start_batch(self, seqs: list[Seq]) -> Batch:
        """A new batch for these rows, started from their cached prefixes where they have one."""
        batch = self.new_batch()
        if isinstance(batch, SlotBatch):
            batch.start_rows([s.prefix for s in seqs])
        for seq in seqs:
            seq.prefilled, seq.prefix = seq.cached, None
            if self.prefixes.budget:
                self.queried_tokens += len(seq.prompt)
                self.hit_tokens += seq.cached
        return batch

    def measure(self, running: Batch) -> None:
        """Note how much of the budget the running rows hold now."""
        self.usage = min(running.nbytes / self.budget, 1.0) if self.budget else 0.0

    def save(self, batch: Batch, row: int, seq: Seq, tokens: list[int], reply: list[ChatMessage]) -> None:
        """Keep `row`'s keys/values for `tokens` (the chat's messages plus `reply`, advertised)."""
        if not isinstance(batch, SlotBatch) or not self.prefixes.budget:
            return
        messages = seq.request.messages
        chats = prefix_hashes([*messages, *reply]) if messages and not seq.request.continuation else []
        self.prefixes.insert(tokens, batch.export(row), chats, _salt(seq))
        self.advertise()

    def advertise(self) -> None:
        self.advertised = self.prefixes.chat_hashes(_ADVERTISED)


def _salt(seq: Seq) -> int:
    """Rows of an adapter hold other keys/values for the same tokens: each load keys its own entries."""
    return seq.adapter.salt if seq.adapter is not None else 0


def _fast_path(model: Any) -> SlotForward | None:
    if not supported(model):
        return None
    weight = model.get_input_embeddings().weight
    if weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and can_pack():
        pack_linears(model)  # single-threaded: no OpenMP team on the caller's thread (packing.py)
    return SlotForward(model)
