"""Managed API keys across two gateway processes: limits counted in the bus, revocation everywhere,
usage equal to what the responses reported, all through the `chatbus keys` command."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from fakes import EchoEngine, echo_node
from permissions import refused
from procs import ROOT, eventually, spawn, stop, wait_until
from prometheus_client.parser import text_string_to_metric_families
from test_gateway_support import EchoNode, LoopThread

from bus import BusClient
from bus.auth import ROLES, provision, with_credential
from bus.connection import connect
from bus.keys import create_key, revoke_key
from bus.operations import ensure_keys_bucket
from bus.server import EmbeddedServer
from bus.setup import prepare_bus
from chatbus.top import top
from gateway.operations import GatewayOps

ECHO, SLOW = "echo-keys", "echo-keys-slow"
STATIC = "sk-static-key"
SAY = [{"role": "user", "content": "one two three four five six"}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keys(nats_url: str, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "chatbus", "keys", *args, "--nats", nats_url],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout


def create(nats_url: str, name: str, *flags: str) -> str:
    return keys(nats_url, "create", "--name", name, *flags).strip().splitlines()[-1]


@pytest.fixture(scope="module")
def echo(nats_url: str) -> Iterator[None]:
    thread = LoopThread()
    try:
        with EchoNode(thread, nats_url, EchoEngine(ECHO, step_s=0.002, max_running=16)):
            with EchoNode(thread, nats_url, EchoEngine(SLOW, step_s=0.3)):
                yield
    finally:
        thread.stop()


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("keys")


@pytest.fixture(scope="module")
def gateways(nats_url: str, echo: None, logs: Path) -> Iterator[list[str]]:
    """Two gateways on one bus, logging JSON; the first also has a static --api-key."""
    procs, urls = [], []
    try:
        for i, extra in enumerate((["--api-key", STATIC], [])):
            port = _free_port()
            argv = [sys.executable, "-m", "gateway", "--nats", nats_url, "--port", str(port), *extra]
            argv += ["--log-format", "json"]
            procs.append(spawn(argv, logs / f"gateway{i}.log"))
            urls.append(f"http://127.0.0.1:{port}")
        for proc, url, i in zip(procs, urls, range(2), strict=True):
            wait_until(lambda url=url: _up(url), 60, proc, logs / f"gateway{i}.log")
        yield urls
    finally:
        for proc in procs:
            stop(proc)


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).json()["nodes"] >= 2
    except (httpx.HTTPError, KeyError, ValueError):
        return False


def chat(url: str, key: str, model: str = ECHO, **body: object) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": model, "messages": SAY, **body},
        timeout=30,
    )


def scrape(url: str, key: str) -> dict[tuple[str, ...], float]:
    """/metrics as {(name, "label=value", ...): value}."""
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {key}"}, timeout=10).text
    return {
        (s.name, *sorted(f"{k}={v}" for k, v in s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _not_at_minute_end() -> None:
    """Counters are per minute: start a minute-bound sequence with time to spare in the minute."""
    if time.time() % 60 > 52:
        time.sleep(61 - time.time() % 60)


def test_sixth_request_in_a_minute_is_refused_on_either_gateway(
    nats_url: str, gateways: list[str], logs: Path
) -> None:
    secret = create(nats_url, "team-a", "--rpm", "5")
    _not_at_minute_end()
    remaining = []
    for i in range(5):
        r = chat(gateways[i % 2], secret, max_tokens=2)
        assert r.status_code == 200, r.text
        remaining.append(int(r.headers["x-ratelimit-remaining-requests"]))
        assert r.headers["x-ratelimit-limit-requests"] == "5"
    assert remaining == [4, 3, 2, 1, 0]
    for url in gateways:
        r = chat(url, secret)
        assert r.status_code == 429, r.text
        assert r.json()["error"]["code"] == "rate_limit_exceeded" and "5 requests per minute" in r.text
        assert 1 <= int(r.headers["Retry-After"]) <= 60
        assert r.headers["x-ratelimit-remaining-requests"] == "0"
    # the static key of the first gateway has no limit
    assert chat(gateways[0], STATIC).status_code == 200
    assert chat(gateways[1], STATIC).status_code == 401  # not the second gateway's key
    # each gateway counts its refusals, by route and by key
    for url in gateways:
        counts = scrape(url, secret)
        assert counts[("chatbus:gateway_rate_limited_total", "key=team-a", "reason=rate_limit_exceeded")] == 1
        assert counts[("chatbus:http_requests_total", "route=/v1/chat/completions", "status=429")] == 1
    refused = {k: v for k, v in scrape(gateways[1], secret).items() if "status=401" in k and "_total" in k[0]}
    assert refused == {("chatbus:http_requests_total", "route=/v1/chat/completions", "status=401"): 1}
    # each gateway's JSON access lines name the key and the model
    for i in range(2):
        lines = [
            json.loads(x) for x in (logs / f"gateway{i}.log").read_text().splitlines() if x.startswith("{")
        ]
        refused = [x for x in lines if x.get("key") == "team-a" and '" 429' in x["message"]]
        assert refused and all(x["model"] == ECHO and x["request_id"] for x in refused), lines[-5:]


async def test_racing_gateways_admit_exactly_the_limit(nats_url: str, gateways: list[str]) -> None:
    secret = create(nats_url, "racer", "--rpm", "5")
    _not_at_minute_end()
    async with httpx.AsyncClient(timeout=30, headers={"Authorization": f"Bearer {secret}"}) as http:
        replies = await asyncio.gather(
            *(
                http.post(f"{gateways[i % 2]}/v1/chat/completions", json={"model": ECHO, "messages": SAY})
                for i in range(12)
            )
        )
    assert sorted(r.status_code for r in replies) == [200] * 5 + [429] * 7
    assert all("5 requests per minute" in r.text for r in replies if r.status_code == 429)


def test_revoked_key_stops_on_every_gateway_within_a_second(nats_url: str, gateways: list[str]) -> None:
    secret = create(nats_url, "leaving")
    assert [chat(url, secret).status_code for url in gateways] == [200, 200]
    assert "leaving" in keys(nats_url, "list")
    keys(nats_url, "revoke", "leaving")
    revoked_at = time.monotonic()
    pending = set(gateways)
    while pending and time.monotonic() - revoked_at < 1.0:
        pending = {url for url in pending if chat(url, secret).status_code != 401}
    assert not pending, f"still accepted a second after revocation: {pending}"
    assert "revoked" in chat(gateways[1], secret).json()["error"]["message"]
    assert "revoked" in keys(nats_url, "list")


def test_an_expired_key_stops_working(nats_url: str, gateways: list[str]) -> None:
    secret = create(nats_url, "brief", "--expires", "6s")  # room for a slow machine to use it once
    assert chat(gateways[0], secret).status_code == 200
    deadline = time.monotonic() + 20
    while (r := chat(gateways[1], secret)).status_code == 200:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert r.status_code == 401 and "expired" in r.json()["error"]["message"]
    assert "expired" in keys(nats_url, "list")


def test_usage_equals_reported_tokens_and_models_are_allowed(nats_url: str, gateways: list[str]) -> None:
    secret = create(nats_url, "metered", "--models", ECHO, "--expires", "1d")
    prompt = completion = 0
    for i, url in enumerate(gateways):
        r = chat(url, secret, max_tokens=3 + i, n=2)
        assert r.status_code == 200, r.text
        prompt += r.json()["usage"]["prompt_tokens"]
        completion += r.json()["usage"]["completion_tokens"]
    sdk = openai.OpenAI(base_url=f"{gateways[1]}/v1", api_key=secret, max_retries=0)
    stream = sdk.chat.completions.create(
        model=ECHO, messages=SAY, max_tokens=4, stream=True, stream_options={"include_usage": True}
    )
    (usage,) = [c.usage for c in stream if c.usage]
    prompt, completion = prompt + usage.prompt_tokens, completion + usage.completion_tokens
    denied = chat(gateways[0], secret, model=SLOW)
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "model_not_allowed"

    def totals() -> tuple[int, int, int]:
        rows = [json.loads(line) for line in keys(nats_url, "usage", "metered", "--json").splitlines()]
        assert all(row["key"] == "metered" and row["model"] == ECHO for row in rows)
        return tuple(sum(row[k] for row in rows) for k in ("requests", "prompt_tokens", "completion_tokens"))  # type: ignore[return-value]

    deadline = time.monotonic() + 10  # a stream's usage is written as its body ends
    while totals() != (3, prompt, completion):
        assert time.monotonic() < deadline, f"{totals()} != {(3, prompt, completion)}"
        time.sleep(0.2)
    assert completion > 0


def test_tokens_per_minute_and_concurrent_streams(nats_url: str, gateways: list[str]) -> None:
    secret = create(nats_url, "thrifty", "--tpm", "5")
    _not_at_minute_end()
    first = chat(gateways[0], secret, max_tokens=3)
    assert first.status_code == 200 and first.json()["usage"]["total_tokens"] >= 5
    r = chat(gateways[1], secret)
    assert r.status_code == 429 and "tokens per minute" in r.text
    assert r.headers["x-ratelimit-remaining-tokens"] == "0"

    single = create(nats_url, "single", "--streams", "1")
    with httpx.stream(
        "POST", f"{gateways[0]}/v1/chat/completions", headers={"Authorization": f"Bearer {single}"},
        json={"model": SLOW, "messages": SAY, "stream": True}, timeout=30,
    ) as slow:  # fmt: skip
        assert slow.status_code == 200
        busy = chat(gateways[1], single)
        assert busy.status_code == 429 and "1 concurrent" in busy.text
        slow.read()
    deadline = time.monotonic() + 5  # the other gateway sees the stream end through its watch
    while (again := chat(gateways[1], single)).status_code == 429:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert again.status_code == 200


def test_managed_keys_close_an_open_gateway(gateways: list[str]) -> None:
    """Once any managed key exists, the gateway without static keys wants one too."""
    r = httpx.get(f"{gateways[1]}/v1/models", timeout=5)
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"


# ----------------------------------------------------------------------------- with role credentials


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    state = tmp_path_factory.mktemp("secured")
    prov = provision(state)
    server = EmbeddedServer(state / "js", port=0, log_file=state / "nats.log", config=prov.config)
    server.start()
    try:
        yield {role: with_credential(server.url, role, prov.passwords[role]) for role in ROLES}
    finally:
        server.stop()


async def test_each_role_does_its_part_and_no_more(secured: dict[str, str]) -> None:
    """Admin makes keys, nodes put metrics, gateways count limits and usage, a UI reads metrics."""
    urls = secured
    admin = await connect(urls["admin"], name="test-admin")
    try:
        await prepare_bus(admin)
        _, record = await create_key(await ensure_keys_bucket(admin.jetstream()), "secured", rpm=2)
    finally:
        await admin.close()
    async with echo_node(urls["node"], EchoEngine("echo-secured")) as node:
        client = await BusClient.connect(urls["gateway"], name="test-gateway")
        ops = GatewayOps(client)
        try:
            assert await ops.ready()
            lease = await ops.limiter.admit(record, "echo-secured")  # type: ignore[union-attr]
            await lease.release(3, 4)
            assert ops.keys.lookup("nope") is None and ops.keys.active  # type: ignore[union-attr]
        finally:
            await ops.stop()
            await client.close()

        async def top_shows_the_node() -> bool:  # the node puts its first snapshot within a second
            out = io.StringIO()
            await top(urls["ui"], 0, True, out)
            return node.node_id in out.getvalue() and "echo-secured" in out.getvalue()

        await eventually(top_shows_the_node, what="the node in `chatbus top`")
    for role, subject in [
        ("gateway", "$KV.cb_keys.forged"),
        ("ui", "$KV.cb_keys.forged"),
        ("worker", "$KV.cb_keys.forged"),
        ("node", "$KV.cb_keys.forged"),
        ("ui", "$KV.cb_metrics.fake-node"),
        ("gateway", "$KV.cb_metrics.fake-node"),
        ("ui", "$KV.cb_limits.req.secured.1"),
        ("worker", "$KV.cb_usage.secured"),
    ]:
        assert await refused(urls[role], "pub", subject), f"{role} may publish {subject}"
    assert not await refused(urls["gateway"], "pub", "$KV.cb_limits.req.secured.1")


async def test_a_revocation_after_a_server_restart_is_seen(tmp_path: Path) -> None:
    """The key table's watch starts over once the gateway's connection is back (the restarted server
    forgot its consumer): a key revoked afterwards stops working on the gateway."""
    server = EmbeddedServer(data_dir=tmp_path / "js", port=0, log_file=tmp_path / "nats.log")
    server.start()
    try:
        client = await BusClient.connect(server.url, name="test-gateway-restart")
        ops = GatewayOps(client)
        try:
            assert await ops.ready()
            admin = await connect(server.url, name="test-admin")
            kv = await ensure_keys_bucket(admin.jetstream())
            secret, _ = await create_key(kv, "survivor")
            await admin.close()
            store = ops.keys
            assert store is not None
            await eventually(
                lambda: store.lookup(secret) is not None, what="the new key in the gateway's store"
            )
            server.kill()
            server.start()  # same port, same data dir
            await eventually(lambda: client.nc.is_connected and client.reconnects(), what="the reconnect")
            admin = await connect(server.url, name="test-admin")
            await revoke_key(await ensure_keys_bucket(admin.jetstream()), "survivor")
            await admin.close()
            await eventually(lambda: store.lookup(secret).revoked, what="the revocation")  # type: ignore[union-attr]
        finally:
            await ops.stop()
            await client.close()
    finally:
        server.stop()
