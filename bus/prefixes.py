"""Conversation prefix hashes: how nodes say which histories they hold and clients find them.

A node that has a conversation's KV cache says so with the hashes of the message prefixes it holds;
a client hashes the messages of its next turn the same way and prefers a node holding the longest
prefix (cache-aware routing without a router). Hashes are over the wire form of each message, chained,
so any client computes them without a tokenizer and any message field (tool calls too) counts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import msgspec

from bus.schemas import ChatMessage

__all__ = ["prefix_hashes"]

_DIGEST = 8  # bytes: 64-bit hashes, compact in a heartbeat and collision-free in practice


def prefix_hashes(messages: Sequence[ChatMessage]) -> list[int]:
    """hashes[k] identifies messages[: k + 1]; equal lists of messages give equal hashes everywhere."""
    out: list[int] = []
    state = b""
    for message in messages:
        state = hashlib.blake2b(state + msgspec.msgpack.encode(message), digest_size=_DIGEST).digest()
        out.append(int.from_bytes(state, "big") >> 1)  # 63 bits: fits a signed int64 on any wire
    return out
