"""Credentials per role on a real nats-server: what each role may not do is refused by the server,
what it needs works end to end, secrets stay private and out of messages, and TLS is wired through."""

from __future__ import annotations

import json
import stat
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from fakes import EchoEngine, echo_node, user
from nats.js.api import ConsumerConfig, DeliverPolicy
from permissions import refusals, runs_an_eval_job

from bus import BusClient, subjects
from bus.auth import ROLES, Provisioned, provision, redact, with_credential
from bus.connection import connect
from bus.errors import BusUnavailable
from bus.schemas import SamplingParams
from bus.server import EmbeddedServer
from chatbus.cli import cmd_setup_bus


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EmbeddedServer, Provisioned]]:
    state = tmp_path_factory.mktemp("state")
    prov = provision(state)
    server = EmbeddedServer(state / "js", port=0, log_file=state / "nats.log", config=prov.config)
    server.start()
    yield server, prov
    server.stop()


@pytest.fixture(scope="module")
def urls(secured: tuple[EmbeddedServer, Provisioned]) -> dict[str, str]:
    server, prov = secured
    return {role: with_credential(server.url, role, prov.passwords[role]) for role in ROLES}


@pytest.fixture(scope="module")
async def ready(secured: tuple[EmbeddedServer, Provisioned], urls: dict[str, str]) -> AsyncIterator[None]:
    await secured[0].wait_jetstream(url=urls["admin"])
    assert await cmd_setup_bus(urls["admin"]) == 0  # as `chatbus up` does: nodes may not create streams
    engine = EchoEngine("echo")
    async with echo_node(urls["node"], engine):
        yield


def test_provisioned_secrets_are_private_and_stable(tmp_path: Path) -> None:
    first = provision(tmp_path / "state")
    again = provision(tmp_path / "state")
    assert first.passwords == again.passwords and set(first.passwords) == set(ROLES)
    assert len(set(first.passwords.values())) == len(ROLES)
    auth = tmp_path / "state" / "auth"
    assert stat.S_IMODE(auth.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    for f in auth.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    config = json.loads(first.config.read_text())
    assert {u["user"] for u in config["authorization"]["users"]} == set(ROLES)


def test_redact_hides_every_password() -> None:
    url = with_credential("nats://a:4222, nats://b:4222", "node", "s3cr3t/+:@")
    assert redact(url) == "nats://node:***@a:4222,nats://node:***@b:4222"
    assert "s3cr3t" not in redact(url) and "s3cr3t" in url
    assert redact("nats://tok3n@host:4222") == "nats://***@host:4222"
    assert redact("nats://host:4222") == "nats://host:4222"


FORBIDDEN = [
    ("ui", "pub", "cb.tok.someone-elses-request", "forge tokens"),
    ("ui", "sub", "cb.tok.>", "read every token stream"),
    ("ui", "sub", "cb.gen.>", "steal requests meant for nodes"),
    ("ui", "sub", "cb.ctl.>", "watch cancels (request ids) of others"),
    ("ui", "sub", "_INBOX_gateway.>", "read the gateway's replies"),
    ("ui", "pub", "$KV.cb_nodes.fake-node", "advertise a fake node"),
    ("ui", "pub", "$JS.API.CONSUMER.CREATE.CB_JOBS", "consume jobs"),
    ("ui", "pub", "$JS.API.STREAM.DELETE.CB_LOGS", "wipe the chat and vote log"),
    ("ui", "pub", "$JS.API.DIRECT.GET.KV_cb_resume.$KV.cb_resume.x", "read prompts kept for resume"),
    ("ui", "pub", "$JS.API.CONSUMER.CREATE.KV_cb_resume", "watch prompts kept for resume"),
    ("worker", "pub", "$KV.cb_resume.x", "rewrite a resume record"),
    ("node", "pub", "$JS.API.STREAM.MSG.GET.KV_cb_resume", "read prompts kept for resume"),
    ("gateway", "pub", "cb.tok.x", "forge tokens"),
    ("gateway", "pub", "cb.job.train.x", "submit jobs"),
    ("gateway", "sub", "cb.gen.>", "take requests"),
    ("node", "pub", "$JS.API.CONSUMER.DURABLE.CREATE.CB_JOBS.cb-train-workers", "consume jobs"),
    ("node", "pub", "$JS.API.CONSUMER.MSG.NEXT.CB_JOBS.cb-train-workers", "pull jobs"),
    ("node", "pub", "$JS.ACK.CB_JOBS.cb-train-workers.1.1.1.1.0", "acknowledge a job"),
    ("node", "pub", "$KV.cb_jobs.x", "rewrite a job's record"),
    ("node", "sub", "_INBOX_ui.>", "read a UI's replies"),
    ("worker", "pub", "cb.tok.x", "forge tokens"),
    ("worker", "sub", "cb.gen.>", "take requests"),
    ("worker", "pub", "$JS.API.STREAM.PURGE.CB_JOBS", "wipe the job queue"),
    # Token streams: each asking role reads its own `cb.tok.<role>.>` only, through named consumers.
    ("ui", "pub", "$JS.API.CONSUMER.CREATE.CB_TOKENS", "read every token stream (unnamed consumer)"),
    ("ui", "pub", "$JS.API.CONSUMER.CREATE.CB_TOKENS.c", "read every token stream (named, no filter)"),
    ("ui", "pub", "$JS.API.CONSUMER.DURABLE.CREATE.CB_TOKENS.c", "read every token stream (durable)"),
    ("ui", "pub", "$JS.API.CONSUMER.CREATE.CB_TOKENS.c.cb.tok.gateway.x", "read a gateway's answer"),
    ("gateway", "pub", "$JS.API.CONSUMER.CREATE.CB_TOKENS.c.cb.tok.ui.x", "read a UI's answer"),
    ("worker", "pub", "$JS.API.CONSUMER.CREATE.CB_TOKENS.c.cb.tok.ui.x", "read a UI's answer"),
    ("ui", "pub", "$JS.API.DIRECT.GET.CB_TOKENS", "read answers by sequence number"),
    ("ui", "pub", "$JS.API.STREAM.MSG.GET.CB_TOKENS", "read answers by sequence number"),
    ("ui", "pub", "$JS.API.CONSUMER.NAMES.CB_TOKENS", "list others' token consumers"),
    ("gateway", "pub", "$JS.API.STREAM.CREATE.CB_TOKENS", "shape the token stream (republish it)"),
    ("ui", "pub", "$JS.API.STREAM.UPDATE.CB_LOGS", "source other streams into one it may read"),
    ("worker", "pub", "$JS.API.STREAM.UPDATE.KV_cb_jobs", "source other streams into one it may read"),
    ("ui", "pub", "$JS.API.STREAM.CREATE.MINE", "create a stream that sources others"),
    ("gateway", "pub", "$JS.API.STREAM.DELETE.KV_cb_nodes", "delete the node table"),
    # Prompts sent by reference (bus/prompts.py): askers write their own, nodes read chunks by subject.
    ("node", "pub", "cb.prompt.gateway.x.0", "write a prompt sent by reference"),
    ("ui", "pub", "cb.prompt.gateway.x.0", "swap a gateway's prompt sent by reference"),
    ("worker", "pub", "cb.prompt.ui.x.0", "swap a UI's prompt sent by reference"),
    ("ui", "pub", "$JS.API.DIRECT.GET.CB_PROMPTS.cb.prompt.gateway.x.0", "read prompts sent by reference"),
    ("gateway", "pub", "$JS.API.DIRECT.GET.CB_PROMPTS", "read prompts by sequence number"),
    ("node", "pub", "$JS.API.DIRECT.GET.CB_PROMPTS", "read prompts by sequence number"),
    ("node", "pub", "$JS.API.STREAM.MSG.GET.CB_PROMPTS", "read prompts by sequence number"),
    ("node", "pub", "$JS.API.CONSUMER.CREATE.CB_PROMPTS", "read every prompt through a consumer"),
    ("node", "pub", "$JS.API.STREAM.PURGE.CB_PROMPTS", "drop prompts in flight"),
    ("gateway", "pub", "$JS.API.STREAM.CREATE.CB_PROMPTS", "shape the prompts stream (republish it)"),
    ("gateway", "pub", "cb.adapters.some-node", "load or unload a node's adapters"),
    ("ui", "sub", "cb.adapters.>", "take adapter commands meant for nodes"),
]


@pytest.mark.parametrize(
    ("role", "action", "subject", "why"), FORBIDDEN, ids=[f"{r}-{w}" for r, _, _, w in FORBIDDEN]
)
async def test_the_server_refuses_what_a_role_may_not_do(
    ready: None, urls: dict[str, str], role: str, action: str, subject: str, why: str
) -> None:
    assert await refusals(urls[role], action, subject), f"{role} could {why}"


@pytest.mark.parametrize(
    ("role", "action", "subject"),
    [
        ("node", "pub", "cb.tok.x"),
        ("ui", "pub", "cb.log.chat"),
        ("worker", "sub", "cb.jobctl.x"),
        ("gateway", "pub", "$KV.cb_resume.x"),
        ("ui", "pub", "$JS.API.DIRECT.GET.KV_cb_nodes.$KV.cb_nodes.x"),
        ("ui", "pub", "$JS.API.CONSUMER.CREATE.CB_TOKENS.c.cb.tok.ui.x"),
        ("gateway", "pub", "$JS.API.CONSUMER.CREATE.CB_TOKENS.c.cb.tok.gateway.x"),
        ("gateway", "pub", "cb.prompt.gateway.x.0"),
        ("ui", "pub", "cb.prompt.ui.x.0"),
        ("node", "pub", "$JS.API.DIRECT.GET.CB_PROMPTS.cb.prompt.ui.x.0"),
        ("ui", "pub", "cb.adapters.some-node"),  # `chatbus adapters load|unload|list`
        ("worker", "pub", "cb.adapters.some-node"),  # a judge loading a trained adapter to evaluate
    ],
)
async def test_what_a_role_needs_is_not_refused(
    ready: None, urls: dict[str, str], role: str, action: str, subject: str
) -> None:
    assert not await refusals(urls[role], action, subject)  # the check above would see a refusal


@pytest.mark.parametrize("role", ["gateway", "ui", "worker"])
async def test_every_asking_role_chats_with_a_node(ready: None, urls: dict[str, str], role: str) -> None:
    client = await BusClient.connect(urls[role], name=f"test-{role}")
    try:
        chunks = [c async for c in client.chat("echo", user("hello there"))]
        assert "hello there" in "".join(getattr(c, "text", "") for c in chunks)
    finally:
        await client.close()


@pytest.mark.parametrize("role", ["gateway", "ui", "worker"])
async def test_a_prompt_over_one_message_goes_by_reference(
    ready: None, urls: dict[str, str], role: str
) -> None:
    """Each asking role stores it under its own user; the node (role `node`) reads it back by
    subject; what the node could read by a wildcard without the request's key is ciphertext."""
    client = await BusClient.connect(urls[role], name=f"test-{role}-big")
    node = await connect(urls["node"], name="test-node-peek")
    try:
        words = " ".join(f"w{i}" for i in range(990))
        big = f"{words} " + "x" * client.max_payload  # ~1 MB words (990 echo tokens + 1 long one)
        stream = client.chat("echo", user(big), SamplingParams(max_tokens=2))
        assert "".join([getattr(e, "text", "") async for e in stream]) == "w0 w1"
        assert stream.request.prompt_ref is not None
        peek = await node.jetstream().get_msg(
            subjects.PROMPTS_STREAM, subject=f"cb.prompt.{role}.*.0", direct=True
        )
        assert peek.data and b"w1 w2 w3" not in peek.data
    finally:
        await node.close()
        await client.close()


async def test_a_consumer_filter_other_than_its_subject_says_is_refused(
    ready: None, urls: dict[str, str]
) -> None:
    """The named create subject is what permissions see; the server holds the config to it, so a ui
    cannot ask for its own subject and filter on a gateway's stream."""
    ui = await connect(urls["ui"], name="test-ui-sneaky")
    try:
        body = {
            "stream_name": subjects.TOKENS_STREAM,
            "config": {
                "name": "c",
                "filter_subject": "cb.tok.gateway.x",
                "deliver_subject": f"{subjects.inbox_prefix('ui')}.x",
                "ack_policy": "none",
            },
        }
        subject = f"$JS.API.CONSUMER.CREATE.{subjects.TOKENS_STREAM}.c.cb.tok.ui.x"
        reply = json.loads((await ui.request(subject, json.dumps(body).encode(), timeout=5)).data)
        assert reply.get("error", {}).get("code") == 400, reply
    finally:
        await ui.close()


async def test_an_asker_reads_its_own_answer_but_not_another_roles(ready: None, urls: dict[str, str]) -> None:
    gateway = await BusClient.connect(urls["gateway"], name="test-gateway-owner")
    ui = await BusClient.connect(urls["ui"], name="test-ui-owner")
    try:
        stream = gateway.chat("echo", user("for the gateway only"))
        assert "for the gateway only" in "".join([getattr(c, "text", "") async for c in stream])
        own = subjects.token("gateway", stream.attempt_request_id)
        assert stream.request.owner == "gateway"
        # The same subscription a BusClient makes, from the ui: the server refuses to create it.
        with pytest.raises(nats.errors.TimeoutError):  # nats-py hears nothing back from a refused request
            await ui.js.subscribe(
                own,
                stream=subjects.TOKENS_STREAM,
                config=ConsumerConfig(name="peek"),
                ordered_consumer=True,
                deliver_policy=DeliverPolicy.ALL,
            )
        sub = await gateway.js.subscribe(
            own, stream=subjects.TOKENS_STREAM, config=ConsumerConfig(name="mine"), ordered_consumer=True
        )
        assert (await sub.next_msg(timeout=5)).data
        await sub.unsubscribe()
    finally:
        await gateway.close()
        await ui.close()


async def test_ui_submits_a_job_that_only_a_worker_runs(ready: None, urls: dict[str, str]) -> None:
    await runs_an_eval_job(urls["ui"], urls["worker"])


async def test_setup_bus_needs_the_admin_credential(
    ready: None, urls: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert await cmd_setup_bus(urls["ui"]) == 1
    assert "use the admin credential" in capsys.readouterr().err
    assert await cmd_setup_bus(urls["admin"]) == 0
    nc = await connect(urls["admin"], name="test-setup-bus")
    try:
        for stream in [
            subjects.TOKENS_STREAM,
            subjects.LOGS_STREAM,
            subjects.JOBS_STREAM,
            subjects.JOB_EVENTS_STREAM,
            *(f"KV_{b}" for b in (subjects.NODES_BUCKET, subjects.RESUME_BUCKET, subjects.JOBS_BUCKET)),
            f"KV_{subjects.EVAL_TRIGGERS_BUCKET}",
            f"OBJ_{subjects.ARTIFACTS_BUCKET}",
        ]:
            assert (await nc.jetstream().stream_info(stream)).config.name == stream
    finally:
        await nc.close()


async def test_a_wrong_password_is_a_clear_error_at_once(secured: tuple[EmbeddedServer, Provisioned]) -> None:
    server, _ = secured
    with pytest.raises(BusUnavailable, match="refused our credentials") as e:
        await connect(with_credential(server.url, "ui", "wrong-password"), name="test", timeout=30)
    assert "wrong-password" not in str(e.value)
    with pytest.raises(BusUnavailable, match="refused our credentials"):
        await connect(server.url, name="test", timeout=30)  # no credential at all


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


def _make_certs(folder: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it."""
    ca_key, ca, key, csr, cert = (folder / n for n in ("ca.key", "ca.pem", "srv.key", "srv.csr", "srv.pem"))
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        ca_key,
        "-out",
        ca,
        "-days",
        "1",
        "-subj",
        "/CN=chatbus test CA",
    )
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1")
    ext = folder / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl(
        "x509",
        "-req",
        "-in",
        csr,
        "-CA",
        ca,
        "-CAkey",
        ca_key,
        "-CAcreateserial",
        "-out",
        cert,
        "-days",
        "1",
        "-extfile",
        ext,
    )
    return ca, cert, key


async def test_tls_with_our_own_ca(tmp_path: Path) -> None:
    ca, cert, key = _make_certs(tmp_path)
    config = tmp_path / "tls.conf"
    config.write_text(json.dumps({"tls": {"cert_file": str(cert), "key_file": str(key)}}))
    server = EmbeddedServer(tmp_path / "js", port=0, log_file=tmp_path / "nats.log", config=config)
    server.start()
    try:
        url = f"tls://127.0.0.1:{server.port}?ca={ca}"
        await server.wait_jetstream(url=url)
        async with echo_node(url, EchoEngine("echo")):
            client = await BusClient.connect(url, name="test-tls")
            try:
                chunks = [c async for c in client.chat("echo", user("over tls"))]
                assert "over tls" in "".join(getattr(c, "text", "") for c in chunks)
            finally:
                await client.close()
        with pytest.raises(BusUnavailable):  # without our CA the server's certificate is not trusted
            await connect(f"tls://127.0.0.1:{server.port}", name="test", timeout=3)
    finally:
        server.stop()
