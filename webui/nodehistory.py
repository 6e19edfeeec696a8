"""The Nodes page's time series: each live node's tok/s, running and queued, sampled from its heartbeats.

Kept in the web process's memory only (the last `window_s` seconds), so a restarted app starts empty;
`chatbus top` and the gateway's /metrics are the places for anything longer.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from bus import NodeInfo

__all__ = ["NodeHistory", "Sample"]


@dataclass(frozen=True)
class Sample:
    at: float  # unix seconds
    tokens_per_s: float
    running: int
    queued: int


class NodeHistory:
    """Samples `nodes()` every `every_s` seconds into a bounded series per node id."""

    def __init__(self, nodes: Callable[[], list[NodeInfo]], every_s: float = 2.0, window_s: float = 600.0):
        self._nodes = nodes
        self.every_s = every_s
        self.window_s = window_s
        self._series: dict[str, deque[Sample]] = {}
        self._task: asyncio.Task[None] | None = None

    def sample(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        for n in self._nodes():
            series = self._series.setdefault(n.node_id, deque(maxlen=int(self.window_s / self.every_s) + 1))
            series.append(Sample(now, round(n.tokens_per_s, 2), n.running, n.queued))
        for node_id in list(self._series):  # forget nodes gone for a whole window
            if self._series[node_id][-1].at < now - self.window_s:
                del self._series[node_id]

    def series(self, node_id: str) -> list[Sample]:
        return list(self._series.get(node_id, ()))

    async def _loop(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.every_s)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
