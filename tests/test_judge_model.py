"""Eval jobs with the real default model: two answering nodes, a judge on the bus and one behind the gateway.

The 135M model is a poor judge, but a judge on the bus is constrained to a JSON verdict, so every one of
its judgments parses. A judge behind an endpoint is not constrained: there every judgment is either
usable or counted as a failure of a named kind, never scored silently.
"""

from __future__ import annotations

import socket
import sys

import httpx
import pytest
from procs import node_process, spawn, stop, wait_until
from test_judge_support import eval_worker, run_eval, wait_models

from bus.client import BusClient
from judge.schemas import EvalResult, EvalSpec
from judge.store import answers_name, judgments_name, parse_jsonl

pytestmark = pytest.mark.model

KEY = "sk-judge-test"
# Tiny on purpose (CPU time): one two-turn math question with a reference, one one-turn writing question.
QUESTIONS = b"""{"question_id": 1, "category": "math", "turns": ["What is 2+3?", "And times 4?"], "reference": ["5", "20"]}
{"question_id": 2, "category": "writing", "turns": ["Write one sentence about rain."]}
"""
JUDGE_KINDS = {"unparseable", "timeout", "unreachable", "rejected", "error"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ready(base: str) -> bool:
    try:
        r = httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=2)
    except httpx.HTTPError:
        return False
    return r.status_code == 200 and "smol-a" in {m["id"] for m in r.json()["data"]}


@pytest.fixture(scope="module")
async def bus(nats_url: str, tmp_path_factory: pytest.TempPathFactory):
    logs = tmp_path_factory.mktemp("judge-model")
    port = _free_port()
    gw_argv = [
        sys.executable,
        "-m",
        "gateway",
        "--nats",
        nats_url,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    with (
        node_process(nats_url, logs / "a.log", name="smol-a"),
        node_process(nats_url, logs / "b.log", name="smol-b"),
    ):
        gateway = spawn([*gw_argv, "--api-key", KEY], logs / "gateway.log")
        try:
            async with eval_worker(nats_url, {"JUDGE_KEY": KEY, "WRONG_KEY": "sk-wrong"}) as client:
                await wait_models(client, ["smol-a", "smol-b"])
                base = f"http://127.0.0.1:{port}"
                wait_until(lambda: _ready(base), 60, gateway, logs / "gateway.log")
                jobs = await client.jobs()
                yield client, jobs, base, await jobs.put_artifact("eval/questions", QUESTIONS)
        finally:
            stop(gateway)


def spec(questions: str, **kw) -> EvalSpec:  # type: ignore[no-untyped-def]
    base = {
        "questions": questions,
        "models": ["smol-a", "smol-b"],
        "judge": "smol-a",
        "question_ids": [1],
        "max_tokens": 16,
        "judge_max_tokens": 24,
        "timeout_s": 120,
    }
    return EvalSpec(**{**base, **kw})


def _accounted(result: EvalResult) -> None:
    """Every judgment is usable or a counted failure of a known kind."""
    judge_failures = {k: v for k, v in result.failures.items() if k in JUDGE_KINDS}
    assert set(result.failures) <= JUDGE_KINDS, result.failures  # all answers came, none missing
    assert result.judged + sum(judge_failures.values()) == result.judgments


async def test_single_end_to_end_with_the_real_model(bus) -> None:  # type: ignore[no-untyped-def]
    _, jobs, _, questions = bus
    job_id, events, result = await run_eval(jobs, spec(questions))
    assert result is not None, events[-1].message
    assert result.answers == 2 and result.judgments == 4  # 2 models x 2 turns
    _accounted(result)
    assert result.judged == 4 and not result.failures, result.failures  # the grammar: every verdict parses
    answers = parse_jsonl(await jobs.get_artifact(answers_name(job_id)))
    assert len(answers) == 2
    assert all(len(a["choices"][0]["turns"]) == 2 and a["choices"][0]["turns"][0] for a in answers)
    judgments = parse_jsonl(await jobs.get_artifact(judgments_name(job_id)))
    assert len(judgments) == 4 and {j["judge"][1] for j in judgments} == {"single-ref", "single-ref-multi"}
    assert all(j["judgment"] or j.get("error") for j in judgments)
    for j in judgments:  # a score only where the verdict parsed
        assert (j["score"] == -1) == bool(j.get("error")) and (j["score"] == -1 or 1 <= j["score"] <= 10)
    assert set(result.scores) == {"smol-a", "smol-b"}  # every verdict parsed: both models have a score
    assert all(1 <= s <= 10 for s in result.scores.values())


async def test_pairwise_end_to_end_with_the_real_model(bus) -> None:  # type: ignore[no-untyped-def]
    _, jobs, _, questions = bus
    pairwise = {"mode": "pairwise-baseline", "models": ["smol-a"], "baseline": "smol-b", "judge": "smol-b"}
    job_id, events, result = await run_eval(jobs, spec(questions, question_ids=[2], **pairwise))
    assert result is not None, events[-1].message
    assert result.judgments == 1  # one one-turn question, judged in both orders
    _accounted(result)
    assert result.judged == 1 and not result.failures, result.failures
    judgments = parse_jsonl(await jobs.get_artifact(judgments_name(job_id)))
    assert len(judgments) == 1 and judgments[0]["g1_judgment"] and judgments[0]["g2_judgment"]
    answers = {
        a["model_id"]: a["choices"][0]["turns"][0]
        for a in parse_jsonl(await jobs.get_artifact(answers_name(job_id)))
    }
    g1, g2 = judgments[0]["g1_user_prompt"], judgments[0]["g2_user_prompt"]
    a_of = lambda prompt: prompt.split("assistant A\n")[1].split("\n## End of A")[0]  # noqa: E731
    assert a_of(g1) == answers["smol-a"] and a_of(g2) == answers["smol-b"]  # game 2 swaps the positions
    assert all({j["g1_winner"], j["g2_winner"]} <= {"model_1", "model_2", "tie", "error"} for j in judgments)


async def test_judge_through_the_gateway_with_the_openai_sdk(bus) -> None:  # type: ignore[no-untyped-def]
    _, jobs, base, questions = bus
    endpoint = {"judge_base_url": f"{base}/v1", "question_ids": [2], "models": ["smol-b"]}
    _, events, result = await run_eval(jobs, spec(questions, **endpoint, judge_api_key_env="JUDGE_KEY"))
    assert result is not None, events[-1].message
    assert result.judgments == 1 and "@ http://127.0.0.1" in result.judge
    _accounted(result)
    assert not {"unreachable", "timeout", "rejected"} & set(result.failures)  # the endpoint answered
    _, _, wrong = await run_eval(jobs, spec(questions, **endpoint, judge_api_key_env="WRONG_KEY"))
    assert wrong is not None and wrong.failures == {"unreachable": 1} and wrong.judged == 0  # HTTP 401


async def test_real_client_sees_both_models(bus) -> None:  # type: ignore[no-untyped-def]
    client, *_ = bus
    assert isinstance(client, BusClient) and {"smol-a", "smol-b"} <= set(client.models())
