"""Credentials of one node or worker each, on a real nats-server with the production permissions:
what a node may not do is refused, an issued node serves, a revoked one is cut off while the others serve."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import tarfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from fakes import EchoEngine, echo_node, user
from permissions import refused
from procs import eventually

from bus import BusClient, subjects
from bus.artifacts import describe, fetch_adapter
from bus.auth import ROLES, Provisioned, provision, with_credential
from bus.codec import encode
from bus.connection import connect
from bus.errors import BadRequest, BusError, BusUnavailable
from bus.jobs import Jobs
from bus.paths import write_nats_url
from bus.schemas import ModelCard, NodeInfo
from bus.server import EmbeddedServer
from bus.tokens import issue, with_creds
from chatbus.cli import cmd_setup_bus
from chatbus.cli import main as cli
from node.adapter_host import AdapterHost
from node.service import NodeService

ISSUED = {
    "alice": ["echo"],
    "bob": ["echo"],
    "carol": ["other"],
    "rev": ["echo"],
    "keep": ["echo"],
    "gone": ["echo"],
}


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("state")


@pytest.fixture(scope="module")
def secured(state: Path) -> Iterator[tuple[EmbeddedServer, Provisioned]]:
    for name, models in ISSUED.items():
        issue(state, name, models=models)
    issue(state, "judge1", "worker")
    prov = provision(state)
    server = EmbeddedServer(state / "js", port=0, log_file=state / "nats.log", config=prov.config)
    server.start()
    yield server, prov
    server.stop()


@pytest.fixture(scope="module")
def urls(secured: tuple[EmbeddedServer, Provisioned], state: Path) -> dict[str, str]:
    server, prov = secured
    out = {role: with_credential(server.url, role, prov.passwords[role]) for role in ROLES}
    write_nats_url(state, out["ui"])  # as `chatbus up` does: `node-token revoke` finds the bus here
    creds = state / "auth" / "creds"
    out |= {name: with_creds(server.url, creds / f"node-{name}.creds") for name in ISSUED}
    return out | {"judge1": with_creds(server.url, creds / "worker-judge1.creds")}


@pytest.fixture(scope="module")
async def ready(secured: tuple[EmbeddedServer, Provisioned], urls: dict[str, str]) -> AsyncIterator[None]:
    await secured[0].wait_jetstream(url=urls["admin"])
    assert await cmd_setup_bus(urls["admin"]) == 0
    async with echo_node(urls["alice"], EchoEngine("echo"), node_id="alice"):
        yield


REFUSED = [
    ("pub", "$JS.API.CONSUMER.CREATE.CB_TOKENS.c.cb.tok.gateway.>", "read a gateway's token streams"),
    ("pub", "$JS.API.CONSUMER.CREATE.CB_TOKENS.c.cb.tok.ui.>", "read the web users' token streams"),
    ("pub", "$JS.API.CONSUMER.CREATE.CB_TOKENS", "read every token stream (unnamed consumer)"),
    ("pub", "$JS.API.DIRECT.GET.CB_TOKENS", "read answers by sequence number"),
    ("pub", "$JS.API.STREAM.INFO.CB_TOKENS", "list the request ids in the token stream"),
    ("pub", "$JS.API.CONSUMER.CREATE.CB_LOGS", "read every web chat and vote"),
    ("pub", "$JS.API.DIRECT.GET.CB_LOGS", "read a web chat by sequence number"),
    ("pub", "$JS.API.DIRECT.GET.KV_cb_resume.$KV.cb_resume.x", "read prompts kept for resume"),
    ("pub", "$JS.API.CONSUMER.CREATE.KV_cb_resume", "watch prompts kept for resume"),
    ("pub", "$JS.API.STREAM.PURGE.CB_TOKENS", "wipe every answer's record"),
    ("pub", "$JS.API.STREAM.DELETE.CB_TOKENS", "delete the token stream"),
    ("pub", "$JS.API.STREAM.UPDATE.CB_TOKENS", "republish the token stream somewhere"),
    ("pub", "$JS.API.STREAM.CREATE.MINE", "create a stream that sources others"),
    ("pub", "$JS.API.STREAM.DELETE.KV_cb_nodes", "delete the node table"),
    ("pub", "$JS.API.STREAM.PURGE.KV_cb_nodes", "wipe the node table"),
    ("pub", "$JS.API.CONSUMER.DURABLE.CREATE.CB_JOBS.cb-train-workers", "consume jobs"),
    ("pub", "$KV.cb_jobs.x", "rewrite a job's record"),
    ("pub", "cb.log.chat", "forge a chat log"),
    ("pub", "cb.gen.echo", "ask other nodes"),
    ("sub", "_INBOX_gateway.>", "read the gateway's replies"),
    ("pub", "cb.adapters.bob", "load or unload another node's adapters"),
]
# What only an issued credential cannot do: it is pinned to its name and models.
PINNED = [
    ("pub", "$KV.cb_nodes.bob.echo", "heartbeat under another node's key"),
    ("pub", "$KV.cb_nodes.alice.other", "advertise a model its credential does not allow"),
    ("pub", "$KV.cb_nodes.alice", "heartbeat under a key without a model"),
    ("sub", "cb.gen.other cb-nodes", "take requests for a model it may not serve"),
    ("sub", "cb.gen.echo", "copy every request for its model (not as the queue group)"),
    ("sub", "cb.gen.echo.bob", "take requests routed to another node"),
    ("sub", "cb.ctl.bob", "watch another node's cancels and probes"),
    ("pub", "cb.ctl.bob", "cancel another node's requests"),
    ("sub", "cb.adapters.bob", "take another node's adapter commands"),
    ("pub", "$JS.API.STREAM.INFO.OBJ_cb_artifacts", "open the artifact store (no --adapters)"),
    ("pub", "$JS.API.CONSUMER.CREATE.OBJ_cb_artifacts", "read training data sets"),
]
CASES = [("node", *c) for c in REFUSED] + [("alice", *c) for c in REFUSED + PINNED]


@pytest.mark.parametrize(("who", "action", "subject", "why"), CASES, ids=[f"{c[0]}-{c[3]}" for c in CASES])
async def test_the_server_refuses_what_a_node_may_not_do(
    ready: None, urls: dict[str, str], who: str, action: str, subject: str, why: str
) -> None:
    assert await refused(urls[who], action, subject), f"{who} could {why}"


@pytest.mark.parametrize(
    ("action", "subject"),
    [
        ("sub", "cb.gen.echo cb-nodes"),
        ("sub", "cb.gen.echo.alice"),
        ("sub", "cb.embed.echo cb-nodes"),
        ("sub", "cb.count.echo cb-nodes"),
        ("sub", "cb.ctl.alice"),
        ("sub", "cb.adapters.alice"),
        ("pub", "$KV.cb_nodes.alice.echo"),
        ("pub", "cb.tok.gateway.some-request"),
    ],
)
async def test_what_a_node_needs_is_not_refused(
    ready: None, urls: dict[str, str], action: str, subject: str
) -> None:
    assert not await refused(urls["alice"], action, subject)


async def test_a_node_answers_a_probe_on_its_control_subject(ready: None, urls: dict[str, str]) -> None:
    """A core request on `cb.ctl.<id>` (what a client sends before failing over): the node replies
    to the asker's inbox, which only `allow_responses` permits."""
    node = await connect(urls["alice"], name="test-alice-probe")
    gateway = await connect(urls["gateway"], name="test-gateway-probe")

    async def answer(msg: nats.aio.msg.Msg) -> None:
        await msg.respond(b"alive")

    try:
        await node.subscribe(subjects.ctl("alice"), cb=answer)
        await node.flush()
        assert (await gateway.request(subjects.ctl("alice"), b"probe", timeout=5)).data == b"alive"
    finally:
        await node.close()
        await gateway.close()


async def test_a_node_will_not_start_with_a_model_its_credential_does_not_allow(
    ready: None, urls: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import node.main

    monkeypatch.setattr(node.main, "build_engine", lambda cfg, adapter_dir=None: EchoEngine("echo"))
    with pytest.raises(BusError, match="may serve other, not 'echo'"):
        await node.main.serve(node.main.NodeConfig(nats=urls["carol"], cache_dir=tmp_path))


async def test_a_node_fetches_an_adapter_only_with_a_credential_that_allows_it(
    ready: None, urls: dict[str, str], tmp_path: Path
) -> None:
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "chatbus.json").write_text('{"name": "tuned", "method": "lora"}')
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as out:
        out.add(tmp_path / "adapter" / "chatbus.json", "chatbus.json")
    nc = await connect(urls["admin"], name="test-admin-artifacts")
    try:
        name = await (await Jobs(nc).start()).put_artifact("models", tar.getvalue())
    finally:
        await nc.close()
    fetched = await fetch_adapter(urls["node"], name, tmp_path / "fetched")  # `chatbus up`'s nodes may
    assert describe(fetched).name == "tuned"
    with pytest.raises(BadRequest, match="--adapters"):  # alice's credential was made without --adapters
        await fetch_adapter(urls["alice"], name, tmp_path / "alice")


async def test_serve_adapters_says_once_that_its_credential_may_not_read_the_jobs(
    ready: None, urls: dict[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """bob's credential was made without --adapters: his node's `--serve-adapters` watch is refused by
    the server (which answers nothing), and the node says what to do, once; `chatbus up`'s node
    credential watches the same jobs without a word."""
    nc = await connect(urls["admin"], name="test-admin-jobs")
    try:
        await Jobs(nc).start()  # the jobs bucket exists, so only a refusal can stop a watch
    finally:
        await nc.close()
    caplog.set_level(logging.WARNING, logger="node.adapter_host")
    hosts = []
    async with contextlib.AsyncExitStack() as stack:
        for who in ("bob", "node"):
            engine = EchoEngine("echo")
            engine.adapters = object()  # as the torch engine's AdapterSet
            service = await stack.enter_async_context(echo_node(urls[who], engine, node_id=who))
            hosts.append(AdapterHost(service, cache_dir=tmp_path / who, serve_new=True))
            await hosts[-1].start()
            stack.push_async_callback(hosts[-1].stop)
        said = lambda: [r.getMessage() for r in caplog.records if "--serve-adapters" in r.getMessage()]  # noqa: E731
        await eventually(lambda: said(), 20, what="the warning")
        await asyncio.sleep(3.0)  # a second refused try (every 2 s) says nothing more
    assert len(said()) == 1 and "node-token create ... --adapters" in said()[0], said()


async def test_an_issued_node_serves_and_a_worker_reads_only_its_own_answers(
    ready: None, urls: dict[str, str]
) -> None:
    judge = await BusClient.connect(urls["judge1"], name="test-judge1")
    try:
        assert judge.owner == "worker-judge1"
        events = [e async for e in judge.chat("echo", user("served by alice"))]
        assert "served by alice" in "".join(getattr(e, "text", "") for e in events)
        assert {e.node_id for e in events} == {"alice"}
    finally:
        await judge.close()
    assert await refused(urls["judge1"], "pub", "$JS.API.CONSUMER.CREATE.CB_TOKENS.c.cb.tok.worker.>")
    assert not await refused(
        urls["judge1"], "pub", "$JS.API.CONSUMER.CREATE.CB_TOKENS.c.cb.tok.worker-judge1.>"
    )


async def test_a_node_is_listed_only_for_the_models_its_credential_allows(
    ready: None, urls: dict[str, str]
) -> None:
    """carol may serve `other` only: serving `echo`, the server refuses her heartbeat and her
    subscriptions; and what alice writes under her own key lists only that key's model."""
    client = await BusClient.connect(urls["gateway"], name="test-listing")
    nc = await connect(urls["alice"], name="test-alice-forges")
    try:
        async with echo_node(urls["carol"], EchoEngine("echo"), node_id="carol"):
            cards = [ModelCard(name=n, context_length=1000) for n in ("echo", "secret")]
            forged = NodeInfo(
                node_id="alice", host="h", pid=1, models=cards, device="cpu", dtype="none", capacity=1
            )
            kv = await nc.jetstream().key_value(subjects.NODES_BUCKET)
            await kv.put(subjects.node_key("alice", "echo"), encode(forged))
            await eventually(lambda: any(n.node_id == "alice" for n in client.nodes()))
            await asyncio.sleep(1.0)  # carol heartbeats at start: long enough for it to show, were it allowed
            assert set(client.models()) == {"echo"}, client.models()
            assert {n.node_id for n in client.models()["echo"].nodes} == {"alice"}
    finally:
        await nc.close()
        await client.close()


async def test_a_revoked_node_is_cut_off_while_another_keeps_serving(
    ready: None, urls: dict[str, str], state: Path
) -> None:
    client = await BusClient.connect(urls["gateway"], name="test-revoke")
    revoked = NodeService(await connect(urls["rev"], name="test-rev"), EchoEngine("echo"), node_id="rev")  # type: ignore[arg-type]
    await revoked.start()
    try:
        async with echo_node(urls["keep"], EchoEngine("echo"), node_id="keep"):
            await eventually(lambda: {"rev", "keep"} <= {n.node_id for n in client.nodes()})
            assert (
                await asyncio.to_thread(cli, ["node-token", "revoke", "rev", "--state-dir", str(state)]) == 0
            )
            await eventually(lambda: not revoked.nc.is_connected, timeout=5)
            with pytest.raises(BusUnavailable, match="refused our credentials"):
                await connect(urls["rev"], name="test-rev-again", timeout=5)
            await asyncio.sleep(1.0)  # a reconnect attempt or two of its own
            assert not revoked.nc.is_connected
            served = set()
            for i in range(6):  # every answer now comes from the nodes still allowed (keep and alice)
                events = [e async for e in client.chat("echo", user(f"still served {i}"))]
                assert f"still served {i}" in "".join(getattr(e, "text", "") for e in events)
                served |= {e.node_id for e in events}
            assert "rev" not in served and served <= {"keep", "alice"}, served
            assert "rev" not in {n.node_id for n in client.nodes()}
    finally:
        await client.close()
        await revoked.drain(0)
        with contextlib.suppress(ConnectionError):  # nats-py, closing while a refused reconnect dies
            await revoked.nc.close()


async def test_a_revoked_node_process_stops(
    ready: None, urls: dict[str, str], state: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`python -m node` with a credential that is revoked stops, saying why, instead of knocking forever."""
    import node.main

    monkeypatch.setattr(node.main, "build_engine", lambda cfg, adapter_dir=None: EchoEngine("echo"))
    client = await BusClient.connect(urls["gateway"], name="test-gone")
    serving = asyncio.create_task(
        node.main.serve(node.main.NodeConfig(nats=urls["gone"], cache_dir=tmp_path))
    )
    try:
        await eventually(lambda: "gone" in {n.node_id for n in client.nodes()})
        assert await asyncio.to_thread(cli, ["node-token", "revoke", "gone", "--state-dir", str(state)]) == 0
        with pytest.raises(BusError, match="refuses this node's credential"):
            await asyncio.wait_for(serving, 30)
    finally:
        serving.cancel()
        await client.close()


async def test_a_node_on_a_bus_nobody_set_up_says_what_to_run(tmp_path: Path) -> None:
    prov = provision(tmp_path)
    server = EmbeddedServer(tmp_path / "js", port=0, log_file=tmp_path / "nats.log", config=prov.config)
    server.start()
    try:
        await server.wait_jetstream(url=with_credential(server.url, "admin", prov.passwords["admin"]))
        with pytest.raises(BusUnavailable, match="chatbus setup-bus"):
            async with echo_node(with_credential(server.url, "node", prov.passwords["node"]), EchoEngine()):
                pass
    finally:
        server.stop()
