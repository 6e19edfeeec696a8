"""A live view of the nodes on the bus, kept from a watch on the `cb_nodes` KV bucket.

KV max-age expiry sends no delete to watchers, so an entry also counts as gone when no heartbeat
refreshed it for NODE_TTL_S: a SIGKILLed node vanishes here within the TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
from nats.errors import TimeoutError as NatsTimeout
from nats.js.kv import KeyValue

from bus import subjects
from bus.codec import decode
from bus.connection import HEARTBEAT_S, NODE_TTL_S
from bus.errors import BadMessage
from bus.schemas import NodeInfo

__all__ = ["ModelEntry", "NodeTable"]

log = logging.getLogger(__name__)

_WATCH_SILENCE_S = 2 * HEARTBEAT_S  # under NODE_TTL_S, so live nodes do not time out meanwhile
# A node holding a conversation's history gets its next turn unless its load (a fraction of its
# capacity) is more than this above the least loaded node's: a prefix hit saves a prefill, not a queue.
CACHE_SLACK = 0.5
_STALL_GRACE_S = 30.0  # how long a bucket that cannot be watched (no leader: a cluster member died) is
# not taken for the death of every node


@dataclass(frozen=True)
class ModelEntry:
    """One model as the bus serves it: the nodes that have it and their summed capacity."""

    name: str
    context_length: int
    can_embed: bool
    nodes: list[NodeInfo]
    base: str = ""  # an adapter's base model (node/lora.py), else empty


def _as_keyed(key: str, info: NodeInfo) -> NodeInfo | None:
    """What the server let the writer of `key` (`<node>.<model>`) say: the node its permissions
    pin, and that model only; None if the entry claims another node's id (bus/auth.py)."""
    node, dot, model = key.partition(".")
    if not dot:
        return info  # a node of an older version: one key per node
    if subjects.kv_token(info.node_id) != node:
        log.warning("ignoring node entry %s: it names node %r", key, info.node_id)
        return None
    cards = [c for c in info.models if subjects.kv_token(c.name) == model]
    return msgspec.structs.replace(info, models=cards) if cards else None


class NodeTable:
    def __init__(self, kv: KeyValue, reconnects: Callable[[], int], ttl_s: float = NODE_TTL_S) -> None:
        self._kv = kv
        self._reconnects = reconnects
        self._ttl_s = ttl_s
        self._seen: dict[str, tuple[NodeInfo, float]] = {}
        self._inflight: dict[str, int] = {}  # requests this client sent since the node's last heartbeat
        self._synced = asyncio.Event()
        self._stalled_since: float | None = None  # the watch is being re-established since
        self._task: asyncio.Task[None] | None = None
        self.on_change: Callable[[], None] | None = None

    async def start(self, timeout: float = 5.0) -> None:
        self._task = asyncio.create_task(self._watch(), name="chatbus-node-watch")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._synced.wait(), timeout)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(self._task, 3.0)

    async def _watch(self) -> None:
        """Watch the bucket; start over whenever the connection was re-established (the server may
        have restarted and forgotten our consumer), the watch broke, or it fell silent: nodes beat
        every HEARTBEAT_S, so silence means the consumer died with its server (in a cluster).

        Until a new watch works, the bucket, not the nodes, is what went quiet: `nodes()` holds
        their clocks from the last thing heard (for up to _STALL_GRACE_S).
        """
        heard = time.monotonic()
        while True:
            watcher = None
            reconnects = self._reconnects()
            try:
                watcher = await self._kv.watchall()
                heard = time.monotonic()
                while self._reconnects() == reconnects:
                    try:
                        entry = await watcher.updates(timeout=1.0)
                    except NatsTimeout:
                        if time.monotonic() - heard > _WATCH_SILENCE_S:
                            self._stalled_since = heard
                            break
                        continue
                    heard = time.monotonic()
                    self._stalled_since = None
                    if entry is None:  # initial values delivered
                        self._synced.set()
                    elif isinstance(entry, KeyValue.Entry):
                        self._apply(entry)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.debug("node watch restarting after %r", e)
                if self._stalled_since is None:
                    self._stalled_since = heard
                await asyncio.sleep(0.5)
            finally:
                if watcher is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(watcher.stop(), 2.0)

    def _apply(self, entry: KeyValue.Entry) -> None:
        if entry.operation in ("DEL", "PURGE") or not entry.value:
            self._seen.pop(entry.key, None)
        else:
            try:
                said = decode(entry.value, NodeInfo)
            except BadMessage as e:
                log.warning("ignoring node entry %s: %s", entry.key, e)
                return
            if (info := _as_keyed(entry.key, said)) is None:
                return
            age = max(0.0, time.time() - info.updated_at) if info.updated_at else 0.0
            self._seen[entry.key] = (info, time.monotonic() - age)
            self._inflight.pop(info.node_id, None)
        if self.on_change:
            self.on_change()

    # ------------------------------------------------------------------ queries

    def nodes(self) -> list[NodeInfo]:
        """Live nodes, freshest heartbeat first."""
        now = time.monotonic()
        if self._stalled_since is not None:
            now = max(self._stalled_since, now - _STALL_GRACE_S)
        horizon = now - self._ttl_s
        live = [(info, t) for info, t in self._seen.values() if t >= horizon]
        return [info for info, _ in sorted(live, key=lambda p: -p[1])]

    def is_alive(self, node_id: str) -> bool:
        return any(n.node_id == node_id for n in self.nodes())

    def models(self) -> dict[str, ModelEntry]:
        out: dict[str, ModelEntry] = {}
        for node in self.nodes():
            for card in node.models:
                prev = out.get(card.name)
                nodes = [*(prev.nodes if prev else []), node]
                ctx = min(card.context_length, prev.context_length) if prev else card.context_length
                embed = card.can_embed and (prev.can_embed if prev else True)
                out[card.name] = ModelEntry(card.name, ctx, embed, nodes, card.base)
        return out

    def candidates(
        self,
        model: str,
        exclude: set[str] = frozenset(),  # type: ignore[assignment]
        prefixes: list[int] | None = None,
    ) -> list[NodeInfo]:
        """Nodes for `model`, best first, then the rest by load.

        Best: with `prefixes` (bus.prefix_hashes of a chat's messages), a node holding the longest of
        them, unless it is much busier than the least loaded node (CACHE_SLACK); else the power of
        two choices on load.
        """
        nodes = [
            n for n in self.nodes() if n.node_id not in exclude and any(c.name == model for c in n.models)
        ]
        if len(nodes) <= 1:
            return nodes
        ranked = sorted(nodes, key=self._load)
        first = self._holder(ranked, prefixes) if prefixes else None
        if first is None:
            a, b = random.sample(nodes, 2)
            first = a if self._load(a) <= self._load(b) else b
        return [first, *(n for n in ranked if n is not first)]

    def _holder(self, ranked: list[NodeInfo], prefixes: list[int]) -> NodeInfo | None:
        """The least loaded of the nodes holding the longest prefix, if not much busier than the idlest."""
        best, holders = 0, []
        for node in ranked:
            held = set(node.cached_prefixes)
            depth = next((k for k in range(len(prefixes), 0, -1) if prefixes[k - 1] in held), 0)
            if depth > best:
                best, holders = depth, [node]
            elif depth == best and depth:
                holders.append(node)
        if not holders or len(holders) == len(ranked):  # nobody, or everybody: load decides
            return None
        first = holders[0]  # ranked by load, so the least loaded holder
        return first if self._load(first) - self._load(ranked[0]) <= CACHE_SLACK else None

    def _load(self, node: NodeInfo) -> float:
        pending = node.running + node.queued + self._inflight.get(node.node_id, 0)
        return pending / max(1, node.capacity)

    def note_dispatch(self, node_id: str, delta: int) -> None:
        """Count requests we sent until the node's next heartbeat reflects them."""
        if node_id:
            self._inflight[node_id] = max(0, self._inflight.get(node_id, 0) + delta)
