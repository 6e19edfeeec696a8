"""Helpers for the gateway tests: a gateway (and echo nodes) served from a background thread's loop.

The gateway gets its own thread and event loop so that blocking clients (the sync `openai` SDK,
LangChain) can call it from the test's thread without freezing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import httpx
import openai
import pytest
import uvicorn
from fakes import EchoEngine
from procs import wait_until

from bus import BusClient
from bus.connection import connect
from gateway import GatewayConfig, build_app
from node.service import NodeService

T = TypeVar("T")


class LoopThread:
    """An event loop in a daemon thread; `call(coro)` runs a coroutine there and waits for it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.call(cancel_all())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class Gateway:
    """A BusClient + build_app + uvicorn on a free port, in `thread`'s loop."""

    def __init__(self, thread: LoopThread, nats_url: str, config: GatewayConfig, **client_options: float):
        self.thread = thread
        self.nats_url = nats_url
        self.config = config
        self.client_options = client_options
        self.client: BusClient | None = None
        self.server: uvicorn.Server | None = None
        self._task: asyncio.Future[None] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _start(self) -> None:
        self.client = await BusClient.connect(self.nats_url, name="test-gateway", **self.client_options)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(build_app(self.client, self.config), log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self._task = asyncio.ensure_future(self.server.serve(sockets=[sock]))
        while not self.server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.01)

    async def _stop(self) -> None:
        assert self.server is not None and self._task is not None and self.client is not None
        self.server.should_exit = True  # not handle_exit: sse-starlette would end every stream in-process
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._task, 10)
        await self.client.close()

    def start(self) -> Gateway:
        self.thread.call(self._start())
        return self

    def stop(self) -> None:
        self.thread.call(self._stop())


@contextlib.contextmanager
def gateway(
    thread: LoopThread, nats_url: str, config: GatewayConfig | None = None, **client_options: float
) -> Iterator[Gateway]:
    gw = Gateway(thread, nats_url, config or GatewayConfig(), **client_options).start()
    try:
        yield gw
    finally:
        gw.stop()


class EchoNode:
    """An EchoEngine behind a real NodeService, living in `thread`'s loop."""

    def __init__(self, thread: LoopThread, nats_url: str, engine: EchoEngine, max_queued: int = 0) -> None:
        self.thread, self.nats_url, self.engine, self.max_queued = thread, nats_url, engine, max_queued
        self.service: NodeService | None = None

    async def _start(self) -> None:
        nc = await connect(self.nats_url, name="test-echo-node")
        self.service = NodeService(nc, self.engine, max_queued=self.max_queued)
        await self.service.start()

    async def _stop(self) -> None:
        assert self.service is not None
        await self.service.drain(timeout=2)
        await self.service.nc.close()

    def __enter__(self) -> EchoNode:
        self.thread.call(self._start())
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.call(self._stop())


def sse_payloads(raw: str) -> list[str]:
    """The data of every SSE event in a raw body, checking the exact `[id: ...\\n]data: ...\\n\\n` framing.

    Keep-alives are lone comment lines (`: keep-alive\\n`) with no blank line of their own, so they
    may sit in front of an event; an event made only of comments (a blank line after a comment) would
    break the OpenAI SDK, and fails here.
    """
    assert raw.endswith("\n\n"), repr(raw[-40:])
    payloads = []
    for event in raw.split("\n\n")[:-1]:
        *head, data = [line for line in event.split("\n") if not line.startswith(":")]
        assert data.startswith("data: ") and len(head) <= 1, repr(event)
        assert all(line.startswith("id: ") for line in head), repr(event)
        payloads.append(data[len("data: ") :])
    return payloads


# ----------------------------------------------------------------------------- the echo bus of the gateway tests
# Module fixtures: a test module binds ECHO_BUS (`thread, engines, nodes, gw, strict = ECHO_BUS`).

KEY = "sk-test-key"


@pytest.fixture(scope="module")
def thread():
    t = LoopThread()
    yield t
    t.stop()


@pytest.fixture(scope="module")
def engines() -> dict[str, EchoEngine]:
    return {
        "echo": EchoEngine("echo", step_s=0.005, max_running=8),
        "slow": EchoEngine("slow", step_s=0.05, max_running=4),
        "tiny": EchoEngine("tiny", step_s=0.05, max_running=1),
    }


@pytest.fixture(scope="module")
def nodes(thread, nats_url, engines):
    with EchoNode(thread, nats_url, engines["echo"]), EchoNode(thread, nats_url, engines["slow"]):
        with EchoNode(thread, nats_url, engines["tiny"]):
            yield


@pytest.fixture(scope="module")
def gw(thread, nats_url, nodes):
    config = GatewayConfig(cors_origins=("http://example.com",), max_body_bytes=2 * 1024 * 1024)
    with gateway(thread, nats_url, config) as g:
        wait_models(g, {"echo", "slow", "tiny"})
        yield g


@pytest.fixture(scope="module")
def strict(thread, nats_url, nodes):
    """API keys, a short generation deadline and a short accept timeout."""
    config = GatewayConfig(api_keys=(KEY, "sk-other"), deadline_s=0.6)
    with gateway(thread, nats_url, config, accept_timeout_s=1.0) as g:
        wait_models(g, {"echo", "slow"}, KEY)
        yield g


def wait_models(g: Gateway, names: set[str], key: str | None = None) -> None:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    wait_until(
        lambda: names <= {m["id"] for m in httpx.get(f"{g.url}/v1/models", headers=headers).json()["data"]},
        15,
        what=f"models {names}",
    )


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def sdk(g: Gateway, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{g.url}/v1", api_key=key, max_retries=0)


async def post(g: Gateway, path: str, body: object, key: str | None = None) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    async with httpx.AsyncClient(base_url=g.url, timeout=30) as http:
        content = body if isinstance(body, bytes | str) else json.dumps(body)
        return await http.post(path, content=content, headers=headers)


def error_of(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


ECHO_BUS = (thread, engines, nodes, gw, strict)  # a test module binds these names to get its own
