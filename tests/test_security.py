"""Credentials per role on a real nats-server: what each role may not do is refused by the server,
what it needs works end to end, secrets stay private and out of messages, and TLS is wired through."""

from __future__ import annotations

import asyncio
import json
import stat
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgspec
import nats
import pytest
from fakes import EchoEngine, echo_node, user

from bus import BusClient, subjects
from bus.auth import ROLES, Provisioned, provision, redact, with_credential
from bus.connection import connect
from bus.errors import BusUnavailable
from bus.jobs import JobContext, Jobs, JobWorker
from bus.server import EmbeddedServer


class Nothing(msgspec.Struct):
    pass


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


async def _refusals(url: str, action: str, subject: str) -> list[str]:
    """The permission errors the server sends for one publish or subscribe with `url`'s credential."""
    errors: list[str] = []

    async def on_error(e: Exception) -> None:
        errors.append(str(e))

    name, password = url.split("//", 1)[1].split("@", 1)[0].split(":", 1)
    nc = await nats.connect(
        url.split("@", 1)[1].join(["nats://", ""]),
        user=name,
        password=password,
        inbox_prefix=subjects.inbox_prefix(name),
        error_cb=on_error,
        allow_reconnect=False,
    )
    try:
        if action == "pub":
            await nc.publish(subject, b"{}")
        else:
            await nc.subscribe(subject)
        await nc.flush()
        for _ in range(50):
            if errors:
                break
            await asyncio.sleep(0.02)
    finally:
        await nc.close()
    return [e for e in errors if "permissions violation" in e.lower()]


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
]


@pytest.mark.parametrize(
    ("role", "action", "subject", "why"), FORBIDDEN, ids=[f"{r}-{w}" for r, _, _, w in FORBIDDEN]
)
async def test_the_server_refuses_what_a_role_may_not_do(
    ready: None, urls: dict[str, str], role: str, action: str, subject: str, why: str
) -> None:
    assert await _refusals(urls[role], action, subject), f"{role} could {why}"


@pytest.mark.parametrize(
    ("role", "action", "subject"),
    [
        ("node", "pub", "cb.tok.x"),
        ("ui", "pub", "cb.log.chat"),
        ("worker", "sub", "cb.jobctl.x"),
        ("gateway", "pub", "$KV.cb_resume.x"),
        ("ui", "pub", "$JS.API.DIRECT.GET.KV_cb_nodes.$KV.cb_nodes.x"),
    ],
)
async def test_what_a_role_needs_is_not_refused(
    ready: None, urls: dict[str, str], role: str, action: str, subject: str
) -> None:
    assert not await _refusals(urls[role], action, subject)  # the check above would see a refusal


@pytest.mark.parametrize("role", ["gateway", "ui", "worker"])
async def test_every_asking_role_chats_with_a_node(ready: None, urls: dict[str, str], role: str) -> None:
    client = await BusClient.connect(urls[role], name=f"test-{role}")
    try:
        chunks = [c async for c in client.chat("echo", user("hello there"))]
        assert "hello there" in "".join(getattr(c, "text", "") for c in chunks)
    finally:
        await client.close()


async def test_ui_submits_a_job_that_only_a_worker_runs(ready: None, urls: dict[str, str]) -> None:
    ui = await connect(urls["ui"], name="test-ui-jobs")
    nc = await connect(urls["worker"], name="test-worker")

    async def handler(ctx: JobContext) -> msgspec.Raw:
        return msgspec.Raw(b'{"ok": true}')

    worker = JobWorker(nc, "eval", handler)
    running = asyncio.create_task(worker.run())
    try:
        jobs = await Jobs(ui).start()
        job_id = await jobs.submit("eval", Nothing())
        events = [e async for e in jobs.events(job_id)]
        assert events[-1].state == "done" and events[-1].result == {"ok": True}, events
    finally:
        worker.stop()
        await running
        await ui.close()
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
