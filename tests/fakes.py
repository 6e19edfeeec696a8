"""A tiny scripted engine and helpers for bus-level tests (the real model is tested through node/hf.py)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import AsyncIterator

import httpx

from bus.connection import connect
from bus.errors import ContextLengthExceeded
from bus.prefixes import prefix_hashes
from bus.schemas import ChatMessage, ModelCard
from node.engine import Delta, EngineRequest, EngineStats, Sink
from node.service import NodeService


class EchoEngine:
    """Answers with the words of the last message, one word per step of `step_s` seconds."""

    def __init__(
        self, name: str = "echo", *, step_s: float = 0.01, max_running: int = 4, context: int = 1000
    ):
        self._card = ModelCard(name=name, context_length=context, can_embed=True)
        self.step_s = step_s
        self._max_running = max_running
        self._queue: deque[tuple[EngineRequest, Sink, list[str]]] = deque()
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.running_ids: set[str] = set()
        self.submitted: list[EngineRequest] = []  # every request that reached this engine
        self.held: list[int] = []  # prefix hashes of the chats it answered, as a caching engine says

    card = property(lambda self: self._card)
    device = property(lambda self: "cpu")
    dtype = property(lambda self: "none")
    max_running = property(lambda self: self._max_running)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        with self._lock:
            for req, sink, _ in self._queue:
                sink(Delta(request_id=req.request_id, finish_reason="cancelled"))
            self._queue.clear()

    def count_tokens(self, messages: list[ChatMessage] | None, prompt: str | None) -> int:
        text = prompt if prompt is not None else " ".join(m.content for m in messages or [])
        return len(text.split())

    def submit(self, request: EngineRequest, sink: Sink) -> int:
        self.submitted.append(request)
        n = self.count_tokens(request.messages, request.prompt)
        if n > self._card.context_length:
            raise ContextLengthExceeded(
                f"prompt has {n} tokens, model context is {self._card.context_length}"
            )
        text = request.prompt if request.prompt is not None else request.messages[-1].content  # type: ignore[index]
        words = text.split()
        skip = len(request.continuation.split())
        limit = request.params.max_tokens or len(words)
        with self._lock:
            self._queue.append(
                (request, sink, [("" if i == 0 else " ") + w for i, w in enumerate(words)][skip:limit])
            )
        return n

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self._cancelled.add(request_id)

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(
                running=len(self._queue), queued=0, tokens_per_s=0.0, cached_prefixes=list(self.held)
            )

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        return [[1.0, 0.0] for _ in texts], sum(len(t.split()) for t in texts)

    def _run(self) -> None:
        produced: dict[str, int] = {}
        while not self._stop.is_set():
            time.sleep(self.step_s)
            with self._lock:
                # cancels apply to queued requests too, as in a real engine
                waiting = [
                    i for i in list(self._queue)[self._max_running :] if i[0].request_id in self._cancelled
                ]
                batch = waiting + list(self._queue)[: self._max_running]
                self.running_ids = {r.request_id for r, _, _ in batch}
            self.steps += 1
            for item in batch:
                req, sink, words = item
                rid = req.request_id
                if rid in self._cancelled:
                    sink(
                        Delta(
                            request_id=rid, finish_reason="cancelled", completion_tokens=produced.get(rid, 0)
                        )
                    )
                    self._drop(item)
                    continue
                n = produced.get(rid, 0)
                if n >= len(words):
                    reason = "length" if req.params.max_tokens == n else "stop"
                    if req.messages:
                        said = ChatMessage(role="assistant", content="".join(words[:n]))
                        self.held.extend(prefix_hashes([*req.messages, said]))
                    sink(Delta(request_id=rid, finish_reason=reason, completion_tokens=n))  # type: ignore[arg-type]
                    self._drop(item)
                    continue
                produced[rid] = n + 1
                sink(Delta(request_id=rid, text=words[n], tokens=1, completion_tokens=n + 1))

    def _drop(self, item: tuple[EngineRequest, Sink, list[str]]) -> None:
        with self._lock:
            self._queue.remove(item)


@contextlib.asynccontextmanager
async def echo_node(url: str, engine: EchoEngine, node_id: str | None = None) -> AsyncIterator[NodeService]:
    """A NodeService around a scripted engine, in this process, on a real nats-server."""
    nc = await connect(url, name="test-node")
    service = NodeService(nc, engine, node_id=node_id, max_queued=0)  # type: ignore[arg-type]
    await service.start()
    try:
        yield service
    finally:
        await service.drain(timeout=2)
        await nc.close()


def user(text: str) -> list[ChatMessage]:
    return [ChatMessage(role="user", content=text)]


async def sse_events(r: httpx.Response) -> AsyncIterator[tuple[str | None, str]]:
    """(id, data) of each SSE event of a streaming response as it arrives; id None when it has none."""
    ident = None
    async for line in r.aiter_lines():
        if line.startswith("id: "):
            ident = line[len("id: ") :]
        elif line.startswith("data: "):
            yield ident, line[len("data: ") :]
            ident = None
