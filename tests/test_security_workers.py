"""Credentials of one worker each on a real nats-server (a kind of jobs only, revocable), and the
`chatbus node-token` / `worker-token` commands and files."""

from __future__ import annotations

import asyncio
import contextlib
import json
import stat
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from permissions import refused, runs_an_eval_job
from procs import eventually

from bus.auth import ROLES, Provisioned, provision, with_credential
from bus.connection import connect
from bus.errors import BusUnavailable
from bus.server import EmbeddedServer
from bus.tokens import creds_in, issue, read_creds, with_creds
from chatbus.cli import cmd_setup_bus
from chatbus.cli import main as cli


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("state")


@pytest.fixture(scope="module")
def secured(state: Path) -> Iterator[tuple[EmbeddedServer, Provisioned]]:
    issue(state, "evals", "worker", kinds=["eval"])
    prov = provision(state)
    server = EmbeddedServer(state / "js", port=0, log_file=state / "nats.log", config=prov.config)
    server.start()
    yield server, prov
    server.stop()


@pytest.fixture(scope="module")
def urls(secured: tuple[EmbeddedServer, Provisioned], state: Path) -> dict[str, str]:
    server, prov = secured
    out = {role: with_credential(server.url, role, prov.passwords[role]) for role in ROLES}
    return out | {"evals": with_creds(server.url, state / "auth" / "creds" / "worker-evals.creds")}


@pytest.fixture(scope="module")
async def ready(secured: tuple[EmbeddedServer, Provisioned], urls: dict[str, str]) -> AsyncIterator[None]:
    await secured[0].wait_jetstream(url=urls["admin"])
    assert await cmd_setup_bus(urls["admin"]) == 0
    yield


@pytest.mark.parametrize(
    ("subject", "why"),
    [
        ("$JS.API.CONSUMER.CREATE.CB_JOBS.cb-train-workers.cb.job.train.>", "take train jobs"),
        (
            "$JS.API.CONSUMER.CREATE.CB_JOBS.cb-eval-workers.cb.job.train.>",
            "filter its consumer on train jobs",
        ),
        ("$JS.API.CONSUMER.DURABLE.CREATE.CB_JOBS.cb-eval-workers", "create its consumer with any filter"),
        ("$JS.API.CONSUMER.MSG.NEXT.CB_JOBS.cb-train-workers", "pull train jobs"),
        ("$JS.ACK.CB_JOBS.cb-train-workers.1.1.1.1.0", "acknowledge a train job"),
        ("cb.tok.x", "forge tokens"),
    ],
)
async def test_a_worker_of_one_kind_takes_only_those_jobs(
    ready: None, urls: dict[str, str], subject: str, why: str
) -> None:
    assert await refused(urls["evals"], "pub", subject), f"an eval worker could {why}"


async def test_an_eval_worker_runs_eval_jobs(ready: None, urls: dict[str, str]) -> None:
    await runs_an_eval_job(urls["ui"], urls["evals"])


async def test_a_revoked_worker_is_cut_off(
    ready: None, secured: tuple[EmbeddedServer, Provisioned], state: Path
) -> None:
    _, path = issue(state, "trainer9", "worker")  # issued while the server runs: a reload admits it
    url = with_creds(secured[0].url, path)
    nc = None
    for _ in range(50):  # the server reloads its config a moment after the signal
        with contextlib.suppress(BusUnavailable):
            nc = await connect(url, name="test-trainer9")
            break
        await asyncio.sleep(0.1)
    assert nc is not None, "a credential issued while the server runs is not admitted"
    try:
        assert (
            await asyncio.to_thread(cli, ["worker-token", "revoke", "trainer9", "--state-dir", str(state)])
            == 0
        )
        await eventually(lambda: not nc.is_connected, timeout=5)
        with pytest.raises(BusUnavailable, match="refused our credentials"):
            await connect(url, name="test-trainer9-again", timeout=5)
    finally:
        await nc.close()


def test_node_token_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state, out = tmp_path / "state", tmp_path / "alice.creds"
    create = [
        "node-token",
        "create",
        "--name",
        "alice-laptop",
        "--models",
        "m1,m2",
        "--state-dir",
        str(state),
    ]
    assert cli([*create, "--url", "nats://bus.example:4222", "--out", str(out)]) == 0
    assert cli([*create[:3], "bad.name", "--state-dir", str(state)]) == 1
    assert cli(["worker-token", "create", "--name", "gpu-box", "--state-dir", str(state)]) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    creds = read_creds(out)
    assert (creds.name, creds.user, creds.models) == ("alice-laptop", "node-alice-laptop", ["m1", "m2"])
    assert creds.url == "nats://bus.example:4222"
    capsys.readouterr()
    assert cli(["node-token", "list", "--state-dir", str(state)]) == 0
    listing = capsys.readouterr().out
    assert "alice-laptop" in listing and "m1,m2" in listing and "gpu-box" not in listing
    assert creds.password not in listing

    def users() -> set[str]:
        config = json.loads((state / "auth" / "nats.conf").read_text())
        return {u["user"] for u in config["authorization"]["users"]}

    assert {"node-alice-laptop", "worker-gpu-box"} <= users()
    assert cli(["node-token", "revoke", "alice-laptop", "--state-dir", str(state)]) == 0
    assert "node-alice-laptop" not in users() and "worker-gpu-box" in users()
    assert cli(["node-token", "revoke", "alice-laptop", "--state-dir", str(state)]) == 1


def test_a_node_joins_with_the_file_and_the_bus_url(tmp_path: Path) -> None:
    from node.__main__ import parse

    _, path = issue(tmp_path / "state", "alice-laptop", models=["m1"], url="nats://127.0.0.1:4222")
    elsewhere = parse(["--creds", str(path), "--nats", "tls://bus.example:4222?ca=/etc/ca.pem"])
    assert elsewhere.nats.startswith("tls://bus.example:4222?ca=/etc/ca.pem&creds=")
    assert creds_in(elsewhere.nats) == read_creds(path)
    assert parse(["--creds", str(path)]).nats.startswith("nats://127.0.0.1:4222?creds=")  # the file's URL
