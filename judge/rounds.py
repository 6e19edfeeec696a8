"""A watch that runs one round every few seconds until stopped (the judge's triggers and adapter evals)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

__all__ = ["Rounds"]

log = logging.getLogger(__name__)


class Rounds:
    """Calls `tick()` every `poll_s` seconds until `stop()`; a failed round (bus trouble) is logged under
    `what`, and the next round tries again."""

    what = "rounds"

    def __init__(self, poll_s: float) -> None:
        self.poll_s = poll_s
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def tick(self) -> object:
        raise NotImplementedError

    async def run(self) -> None:
        while not self._stop.is_set():
            try:
                await self.tick()
            except Exception as e:
                log.warning("%s: %r", self.what, e)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.poll_s)
