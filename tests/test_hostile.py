"""Names that would break subjects get a clear 400 at every edge, and a component whose connection
the NATS server closes (as it does after a protocol error) reconnects and serves again by itself.

Real parts: a nats-server of our own (with a low max_control_line, so a name the bus accepts can
still make the server close the gateway's connection), a real node serving the default model, a
real gateway process, the official openai client. Recovery times are printed, never asserted.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from fakes import EchoEngine, echo_node, user
from procs import eventually, node_argv, spawn, stop, wait_until

from bus import BusClient, BusError, Chunk, Done, subjects
from bus.errors import InvalidName
from bus.server import EmbeddedServer, free_port

MODEL = "SmolLM2-135M-Instruct"
CONTROL_LINE = 512  # the server's max_control_line: a 250-character model name of '/' escapes past it
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def measured(what: str, seconds: float) -> None:
    print(f"\n[recovery] {what}: {seconds:.1f} s")


@pytest.fixture(scope="module")
def strict_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    data = tmp_path_factory.mktemp("nats-strict")
    conf = data / "server.conf"
    conf.write_text(f"max_control_line: {CONTROL_LINE}\n")
    server = EmbeddedServer(data_dir=data / "js", port=0, log_file=data / "nats.log", config=conf)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stack(strict_server: EmbeddedServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real node and a real gateway process on the strict server; the gateway's URL."""
    logs = tmp_path_factory.mktemp("hostile")
    node = spawn(node_argv(strict_server.url), logs / "node.log")
    port = free_port()
    argv = [sys.executable, "-m", "gateway", "--nats", strict_server.url, "--port", str(port)]
    gw = spawn([*argv, "--log-level", "warning"], logs / "gateway.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _health(url) == "ok", timeout=180, proc=gw, log=logs / "gateway.log")
        yield url
    finally:
        stop(gw)
        stop(node)
        print((logs / "gateway.log").read_text()[-3000:])


def _health(url: str) -> str:
    try:
        return str(httpx.get(f"{url}/health", timeout=2).json().get("status"))
    except (httpx.HTTPError, ValueError):
        return "down"


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def france(url: str) -> str:
    reply = sdk(url).chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=8)  # type: ignore[arg-type]
    return reply.choices[0].message.content or ""


# ----------------------------------------------------------------------------- the rule itself


def test_names_are_bounded_once_for_every_subject() -> None:
    assert subjects.check_name("meta-llama/Llama-3.1-8B-Instruct", "model")
    assert subjects.gen("模型 ✓")  # any printable Unicode, escaped
    for bad, why in (("", "empty"), ("x" * 10_000, "bytes"), ("a\nb", "control"), ("é" * 200, "bytes")):
        with pytest.raises(InvalidName, match=why) as info:
            subjects.gen(bad)
        assert info.value.field == "model"
    builders = {
        "node_id": lambda v: subjects.ctl(v),
        "request_id": lambda v: subjects.token("gateway", v),
        "owner": lambda v: subjects.token(v, "r1"),
        "job_id": lambda v: subjects.job_events(v),
    }
    for field, build in builders.items():
        with pytest.raises(InvalidName) as info:
            build("x" * 300)
        assert info.value.field == field
    longest = subjects.gen_node("/" * subjects.MAX_NAME_BYTES, "\u2603" * (subjects.MAX_NAME_BYTES // 3))
    assert len(longest) < 4096 - 200  # room for PUB, a reply inbox and the size within max_control_line


# ----------------------------------------------------------------------------- the gateway, for real


def test_oversized_and_empty_model_names_are_400_and_the_gateway_goes_on(stack: str) -> None:
    for model in ("x" * 10_000, "", "a\u0000b"):
        with pytest.raises(openai.BadRequestError) as info:
            sdk(stack).chat.completions.create(model=model, messages=FRANCE)  # type: ignore[arg-type]
        assert info.value.status_code == 400
        assert info.value.body["param"] == "model", info.value.body  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        sdk(stack).completions.create(model="y" * 10_000, prompt="hi")
    with pytest.raises(openai.NotFoundError):
        sdk(stack).chat.completions.create(model="not-served", messages=FRANCE)  # type: ignore[arg-type]
    assert _health(stack) == "ok"
    assert "Paris" in france(stack)


def test_gateway_reconnects_after_the_server_closes_its_connection(stack: str, strict_server) -> None:  # type: ignore[no-untyped-def]
    """A name within the bus's bound but over this server's max_control_line: the server answers
    -ERR and closes the gateway's connection (nats-py alone would stay closed for good)."""
    log = Path(strict_server.log_file)
    before = log.read_text().count("maximum control line exceeded")
    with pytest.raises(openai.APIStatusError):  # whatever the status: an answer, not a hang
        sdk(stack).chat.completions.create(model="/" * 250, messages=FRANCE)  # type: ignore[arg-type]
    dropped = time.monotonic()
    assert log.read_text().count("maximum control line exceeded") > before  # the server did close it
    answer = ""
    while time.monotonic() - dropped < 30 and "Paris" not in answer:
        try:
            answer = france(stack)
        except openai.APIError:
            time.sleep(0.2)
    measured(
        "server closed the gateway's connection (-ERR) -> a whole answer again", time.monotonic() - dropped
    )
    assert "Paris" in answer
    assert _health(stack) == "ok"


# ----------------------------------------------------------------------------- in-process clients


async def test_client_and_node_reconnect_after_a_server_error(strict_server: EmbeddedServer) -> None:
    """The same -ERR on a node's and on a client's connection: both come back, the answer flows."""
    async with echo_node(strict_server.url, EchoEngine("echo-h", step_s=0.01)) as node:
        client = await BusClient.connect(strict_server.url, name="hostile-client", stall_check_s=0.5)
        try:
            await eventually(lambda: "echo-h" in client.models(), 15)
            for nc in (node.nc, client.nc):  # a protocol line over max_control_line
                await nc.publish("cb.raw." + "z" * CONTROL_LINE, b"")
                await eventually(lambda nc=nc: nc.stats["reconnects"] >= 1 and nc.is_connected, 10)
            with pytest.raises(BusError, match="model"):
                await client.chat("\x00", user("never sent")).start()
            text = ""
            for _ in range(50):
                try:
                    events = [e async for e in client.chat("echo-h", user("back on the bus"))]
                    assert isinstance(events[-1], Done)
                    text = "".join(e.text for e in events if isinstance(e, Chunk))
                    break
                except BusError:
                    await asyncio.sleep(0.2)
            assert text == "back on the bus"
            assert not node.nc.is_closed and not client.nc.is_closed
        finally:
            await client.close()
