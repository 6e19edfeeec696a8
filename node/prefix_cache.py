"""A bounded, least-recently-used cache of prompt KV prefixes, matched in blocks of tokens.

An entry is a copy of one row's keys/values for its first n tokens. Each block boundary of an entry is
indexed by a chained hash of the tokens up to it, so a new prompt finds the entry sharing the most
whole blocks with it in O(prompt / BLOCK), then the match goes on token by token into the last block. Entries are copies, never views of
a running row, so evicting one never waits on (or disturbs) a sequence being decoded. An entry that is
a prefix of a newer one (turn N of a conversation when turn N + 1 is saved) is dropped as redundant.
Each entry also carries the bus.prefix_hashes of the chat it came from, which the node advertises.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

__all__ = ["BLOCK", "PrefixCache"]

BLOCK = 16  # tokens per block

KV = tuple[list[torch.Tensor], list[torch.Tensor]]  # keys, values: [kv_heads, n, head_dim] per layer


@dataclass(eq=False)
class _Entry:
    key: int
    blocks: list[int]  # chained block hashes
    tokens: list[int]
    kv: KV
    nbytes: int
    chats: list[int] = field(default_factory=list)  # bus.prefix_hashes of the messages held
    salt: int = 0  # whose keys/values (0: the base model's; else a LoRA adapter's, node/lora.py)


def _chain(tokens: list[int], blocks: int, salt: int = 0) -> list[int]:
    out: list[int] = []
    state = salt
    for k in range(blocks):
        state = hash((state, *tokens[k * BLOCK : (k + 1) * BLOCK]))
        out.append(state)
    return out


class PrefixCache:
    """Prompt prefixes by token blocks, within `budget` bytes (0 turns the cache off)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.nbytes = 0
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # least recently used first
        self._index: dict[int, list[_Entry]] = {}  # block hash -> entries holding that prefix
        self._ids = itertools.count()
        self.hits = 0
        self.hit_tokens = 0

    def lookup(self, tokens: list[int], salt: int = 0) -> tuple[int, KV] | None:
        """The longest cached prefix of `tokens` that leaves at least one token to feed: (n, kv);
        `salt` says whose keys/values (an adapter's differ from the base's for the same tokens)."""
        blocks = (len(tokens) - 1) // BLOCK
        for k, state in reversed(list(enumerate(_chain(tokens, blocks, salt), start=1))):
            holders = [h for h in self._index.get(state, []) if h.salt == salt]
            if holders:
                entry = holders[-1]
                self._entries.move_to_end(entry.key)
                n = k * BLOCK
                stop = min(len(entry.tokens), len(tokens) - 1)
                while n < stop and entry.tokens[n] == tokens[n]:  # the last partial block, token by token
                    n += 1
                self.hits += 1
                self.hit_tokens += n
                return n, ([t[:, :n] for t in entry.kv[0]], [t[:, :n] for t in entry.kv[1]])
        return None

    def insert(self, tokens: list[int], kv: KV, chats: list[int], salt: int = 0) -> None:
        """Keep `tokens`' keys/values `kv` (as many columns as tokens, or fewer: then that many)."""
        n = min(len(tokens), int(kv[0][0].shape[1]))
        blocks = n // BLOCK
        if blocks == 0 or self.budget <= 0:
            return
        chain = _chain(tokens, blocks, salt)
        for holder in self._index.get(chain[-1], []):
            if (
                holder.salt == salt and holder.tokens[:n] == tokens[:n]
            ):  # already held, by this entry or a longer one
                holder.chats = list(dict.fromkeys([*holder.chats, *chats]))
                self._entries.move_to_end(holder.key)
                return
        nbytes = sum(t[:, :n].numel() * t.element_size() for t in [*kv[0], *kv[1]])
        if nbytes > self.budget:
            return
        for state in chain:  # older entries that are a prefix of this one: redundant now
            for holder in list(self._index.get(state, [])):
                if holder.blocks[-1] == state and holder.salt == salt:
                    self._remove(holder)
        self.shrink_to(self.budget - nbytes)
        keys = [t[:, :n].clone() for t in kv[0]]
        values = [t[:, :n].clone() for t in kv[1]]
        entry = _Entry(next(self._ids), chain, list(tokens[:n]), (keys, values), nbytes, chats, salt)
        self._entries[entry.key] = entry
        for state in chain:
            self._index.setdefault(state, []).append(entry)
        self.nbytes += nbytes

    def shrink_to(self, limit: int) -> None:
        """Evict least recently used entries until at most `limit` bytes are held."""
        while self._entries and self.nbytes > max(limit, 0):
            self._remove(next(iter(self._entries.values())))

    def chat_hashes(self, limit: int = 64) -> list[int]:
        """bus.prefix_hashes of the conversations held, most recently used first, at most `limit`."""
        out: dict[int, None] = {}
        for entry in reversed(self._entries.values()):
            for h in reversed(entry.chats):
                out.setdefault(h, None)
                if len(out) >= limit:
                    return list(out)
        return list(out)

    def __len__(self) -> int:
        return len(self._entries)

    def _remove(self, entry: _Entry) -> None:
        if self._entries.pop(entry.key, None) is None:
            return
        self.nbytes -= entry.nbytes
        for state in entry.blocks:
            holders = self._index.get(state, [])
            if entry in holders:
                holders.remove(entry)
            if not holders:
                self._index.pop(state, None)
