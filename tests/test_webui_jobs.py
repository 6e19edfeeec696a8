"""The Jobs, leaderboard-judge, Usage and Nodes pages' data (UI-free, values worked out by hand), and their
failed states with NiceGUI's simulated user on a real nats-server."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
from nicegui.testing import User
from nicegui.testing.user_simulation import user_simulation
from permissions import refused
from procs import eventually
from test_webui import nicegui_storage

from bus import BusClient, EmbeddedServer, NodeInfo, subjects
from bus.auth import ROLES, provision, with_credential
from bus.connection import connect
from bus.keys import add_usage, create_key
from bus.operations import ensure_keys_bucket, ensure_usage_bucket
from bus.schemas_jobs import JobRecord
from bus.schemas_keys import KeyRecord, KeyUsage
from chatbus.cli import cmd_setup_bus
from webui.app import build_root
from webui.config import WebConfig
from webui.jobdata import category_scores, judge_board, linked_evals, verdict_rows
from webui.nodehistory import NodeHistory
from webui.services import Services
from webui.usage import UsageReport, admin_mark, key_rows, token_matches

__all__ = ["nicegui_storage"]  # a fixture, imported so that pytest finds it here

SINGLE = [
    {"question_id": 1, "category": "math", "model": "a", "turn": 1, "score": 4},
    {"question_id": 2, "category": "math", "model": "a", "turn": 1, "score": 8},
    {"question_id": 3, "category": "coding", "model": "a", "turn": 1, "score": -1, "error": "unparseable"},
    {"question_id": 1, "category": "math", "model": "b", "turn": 1, "score": 10},
]
PAIRWISE = [  # the position swap: a winner only when both games agree
    {"question_id": 1, "category": "math", "model_1": "a", "model_2": "b", "turn": 1,
     "g1_winner": "model_1", "g2_winner": "model_1"},
    {"question_id": 2, "category": "math", "model_1": "a", "model_2": "b", "turn": 1,
     "g1_winner": "model_1", "g2_winner": "model_2"},
    {"question_id": 3, "category": "math", "model_1": "a", "model_2": "b", "turn": 1,
     "g1_winner": "error", "g2_winner": "model_2", "error": "timeout"},
]  # fmt: skip


def record(job_id: str, kind: str, state: str, result: object = None, at: float = 1.0) -> JobRecord:
    return JobRecord(job_id=job_id, kind=kind, state=state, submitted_at=at, updated_at=at,  # type: ignore[arg-type]
                     spec=msgspec.Raw(b"{}"), result=result)  # fmt: skip


def test_category_scores_single_means_leave_failures_out() -> None:
    assert category_scores(SINGLE) == {"a": {"math": 6.0}, "b": {"math": 10.0}}


def test_category_scores_pairwise_adjusted_win_rate_with_position_swap() -> None:
    # a: one win, one tie (the games disagree) -> 75 %; b: one loss, one tie -> 25 %; the failed one left out
    assert category_scores(PAIRWISE) == {"a": {"math": 75.0}, "b": {"math": 25.0}}


def test_verdict_rows_say_who_won_and_what_was_not_scored() -> None:
    assert [r["verdict"] for r in verdict_rows(SINGLE)] == [
        "4/10",
        "8/10",
        "not scored (unparseable)",
        "10/10",
    ]
    assert [r["verdict"] for r in verdict_rows(PAIRWISE)] == ["a", "tie", "not scored (timeout)"]
    assert verdict_rows(PAIRWISE)[0]["model"] == "a vs b"


def test_judge_board_keeps_each_models_latest_finished_result() -> None:
    records = [
        record(
            "eval-1", "eval", "done", {"judge": "j", "questions": 3, "scores": {"a": 5.0, "b": 6.0}}, at=1
        ),
        record("eval-2", "eval", "done", {"judge": "j", "questions": 3, "scores": {"a": 7.5}}, at=2),
        record("eval-3", "eval", "failed", {"scores": {"a": 1.0}}, at=3),
        record("eval-4", "eval", "done", {"win_rates": {"c": 0.25}}, at=4),
        record("train-1", "train", "done", {"scores": {"a": 9.0}}, at=5),
    ]
    board = judge_board(records)
    assert {m: (v["value"], v["job_id"]) for m, v in board.items()} == {
        "a": (7.5, "eval-2"), "b": (6.0, "eval-1"), "c": (0.25, "eval-4"),
    }  # fmt: skip
    assert board["c"]["kind"] == "win_rate"


def test_linked_evals_are_found_wherever_a_writer_put_them() -> None:
    assert linked_evals({"job_id": "train-1", "result": {"name": "m"}}) == []
    raw = {"eval": {"scores": {"m": 6.0, "base": 5.0}}, "result": {"eval_job": "eval-9"}}
    assert linked_evals(raw) == [("eval", {"scores": {"m": 6.0, "base": 5.0}}), ("eval-9", {})]


def test_the_closed_loops_fields_on_a_train_record_are_linked() -> None:
    raw = {"kind": "train", "eval_job": "eval-20261207-1-abc", "scores": {"m": 6.0, "base": 5.0}}
    assert linked_evals(raw) == [
        ("eval-20261207-1-abc", {}),
        ("judged against its base", {"scores": raw["scores"]}),
    ]
    assert linked_evals({"kind": "eval", "scores": {"m": 1.0}}) == []  # an eval's own scores are no link


def test_key_rows_total_requests_and_tokens_without_secrets() -> None:
    now = time.time()
    today = time.strftime("%Y-%m-%d", time.gmtime(now))
    keys = [KeyRecord(name="team-a", sha256="ab" * 32, rpm=5, created_at=now),
            KeyRecord(name="old", sha256="cd" * 32, revoked=True),
            KeyRecord(name="gone", sha256="ef" * 32, expires_at=now - 1)]  # fmt: skip
    usage = [KeyUsage(key="team-a", model="m", day=today, requests=2, prompt_tokens=30, completion_tokens=9),
             KeyUsage(key="team-a", model="m", day="2020-01-01", requests=5, prompt_tokens=1, completion_tokens=1)]  # fmt: skip
    rows = {r["name"]: r for r in key_rows(UsageReport(keys, usage), now)}
    assert (rows["team-a"]["requests"], rows["team-a"]["today"], rows["team-a"]["prompt"]) == (7, 2, 31)
    assert [rows[n]["state"] for n in ("team-a", "old", "gone")] == ["live", "revoked", "expired"]
    assert all("ab" * 32 not in str(v) for row in rows.values() for v in row.values())


def test_admin_token_check() -> None:
    assert token_matches(" s3cret ", "s3cret") and not token_matches("s3cre", "s3cret")
    assert not token_matches("", "")  # no token configured: nobody signs in
    assert admin_mark("a") != admin_mark("b")


def test_node_history_keeps_a_window_per_node() -> None:
    nodes: list[NodeInfo] = []
    history = NodeHistory(lambda: nodes, every_s=1.0, window_s=10.0)
    info = NodeInfo(node_id="n1", models=[], host="h", pid=1, device="cpu", dtype="f32", capacity=4,
                    running=1, queued=2, tokens_per_s=12.345, started_at=0.0)  # fmt: skip
    nodes.append(info)
    for t in range(20):
        history.sample(now=1000.0 + t)
    series = history.series("n1")
    assert len(series) == 11 and series[-1].at == 1019.0  # the last window only
    assert (series[-1].tokens_per_s, series[-1].running, series[-1].queued) == (12.35, 1, 2)
    nodes.clear()
    history.sample(now=1025.0)
    assert history.series("n1")  # gone for less than a window: kept
    history.sample(now=1030.0)
    assert history.series("n1") == []


# ----------------------------------------------------------------------------- failed states


@contextlib.asynccontextmanager
async def simulated(services: Services) -> AsyncIterator[User]:
    async with user_simulation(root=build_root(lambda: services)) as user:
        yield user


async def test_pages_say_what_to_do_when_the_bus_refuses(client: BusClient, nats_url: str) -> None:
    config = WebConfig(nats=nats_url, admin_token="tok", usage_nats="nats://127.0.0.1:1")  # nobody there
    services = await Services.start(config, client=client)
    services.job_records, services.jobs, services.jobs_error = None, None, "refused by the test"
    try:
        async with simulated(services) as user:
            await user.open("/jobs")
            await user.should_see("The job records could not be opened (refused by the test)")
            await user.open("/jobs/train-nope")
            await user.should_see("The job records could not be opened")
            await user.open("/usage")
            await user.should_see("For admins only")
            user.find(marker="admin-token").type("tok")
            user.find(marker="admin-sign-in-button").click()
            await user.should_see("The bus refused the key and usage records", retries=100)
    finally:
        await services.close()


async def test_jobs_page_empty_state_and_unknown_job(client: BusClient, nats_url: str) -> None:
    services = await Services.start(WebConfig(nats=nats_url), client=client)
    try:
        async with simulated(services) as user:
            await user.open("/jobs")
            await user.should_see("No jobs yet.")
            await user.should_see("chatbus train submit --data chats.jsonl")
            await user.open("/jobs/train-nope")
            await user.should_see("No job 'train-nope' on this bus")
            failed = record("eval-failed-1", "eval", "failed", at=time.time())
            await services.jobs.put_record(msgspec.structs.replace(failed, message="JudgeFailure: no judge"))  # type: ignore[union-attr]
            await eventually(lambda: services.job_records.get("eval-failed-1") is not None)  # type: ignore[union-attr]
            await user.open("/jobs/eval-failed-1")
            await user.should_see("The job failed: JudgeFailure: no judge")
            await user.open("/usage")
            await user.should_see("For admins only")  # no admin token configured: nobody can sign in
            user.find(marker="admin-token").type("")
            user.find(marker="admin-sign-in-button").click()
            await user.should_see("not the admin token")
    finally:
        await services.close()


# ----------------------------------------------------------------------------- with credentials


class NoSpec(msgspec.Struct, frozen=True):
    pass


async def test_the_web_apps_credentials_on_a_secured_bus(tmp_path: Path) -> None:
    """As under `chatbus up`: the ui credential follows and cancels jobs and reads key usage (counts
    without the key's hash) but may not write a key or a usage counter."""
    prov = provision(tmp_path / "state")
    server = EmbeddedServer(tmp_path / "js", port=0, log_file=tmp_path / "nats.log", config=prov.config)
    server.start()
    try:
        urls = {role: with_credential(server.url, role, prov.passwords[role]) for role in ROLES}
        await server.wait_jetstream(url=urls["admin"])
        assert await cmd_setup_bus(urls["admin"]) == 0
        admin = await connect(urls["admin"], name="test-admin")
        await create_key(await ensure_keys_bucket(admin.jetstream()), "team-b", rpm=5)
        await add_usage(await ensure_usage_bucket(admin.jetstream()), "team-b", "m", 3, 4, at=time.time())
        await admin.close()
        for bucket in (subjects.KEYS_BUCKET, subjects.USAGE_BUCKET):
            assert await refused(urls["ui"], "pub", f"$KV.{bucket}.team-b"), f"ui may write {bucket}"
        async with await BusClient.connect(urls["ui"], name="test-web") as client:
            services = await Services.start(WebConfig(nats=urls["ui"]), client=client)
            try:
                report = await services.usage.read()
                assert not report.error, report.error
                assert [(r["name"], r["requests"], r["prompt"]) for r in key_rows(report)] == [
                    ("team-b", 1, 3)
                ]
                assert services.jobs is not None and services.job_records is not None, services.jobs_error
                job_id = await client.submit_job("train", NoSpec())  # no worker: it stays queued
                await eventually(lambda: services.job_records.get(job_id) is not None)  # type: ignore[union-attr]
                await services.jobs.cancel(job_id)
                await eventually(lambda: services.job_records.get(job_id).state == "cancelled")  # type: ignore[union-attr]
            finally:
                await services.close()
    finally:
        server.stop()
