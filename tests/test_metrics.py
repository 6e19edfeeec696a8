"""/metrics on a gateway process after a known workload on the real model (and an echo node beside it):
counters and histogram counts equal what the responses reported, for every node on the bus."""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pexpect
import pytest
from fakes import EchoEngine
from procs import ROOT, node_process, spawn, stop, wait_until
from prometheus_client.parser import text_string_to_metric_families
from test_gateway_support import EchoNode, LoopThread

pytestmark = pytest.mark.model

MODEL, ECHO = "smol-metrics", "echo-metrics"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _models(url: str) -> set[str]:
    try:
        return {m["id"] for m in httpx.get(f"{url}/v1/models", timeout=2).json()["data"]}
    except (httpx.HTTPError, KeyError, ValueError):
        return set()


@pytest.fixture(scope="module")
def echo(nats_url: str) -> Iterator[EchoNode]:
    thread = LoopThread()
    try:
        with EchoNode(thread, nats_url, EchoEngine(ECHO, step_s=0.002)) as node:
            yield node
    finally:
        thread.stop()


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("metrics")


@pytest.fixture(scope="module")
def url(nats_url: str, echo: EchoNode, logs: Path) -> Iterator[str]:
    port = _free_port()
    argv = [sys.executable, "-m", "gateway", "--nats", nats_url, "--port", str(port), "--log-format", "json"]
    with node_process(nats_url, logs / "node.log", name=MODEL, extra=["--log-format", "json"]) as node:
        gw = spawn(argv, logs / "gateway.log")
        try:
            base = f"http://127.0.0.1:{port}"
            wait_until(
                lambda: node.poll() is None and {MODEL, ECHO} <= _models(base), 180, gw, logs / "gateway.log"
            )
            yield base
        finally:
            assert stop(gw) in (0, -15), (logs / "gateway.log").read_text()


def scrape(url: str) -> Samples:
    r = httpx.get(f"{url}/metrics", timeout=5)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name` over every series whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def test_counters_and_histograms_match_the_workload(url: str, echo: EchoNode) -> None:
    sdk = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
    prompt = completion = 0
    reasons: dict[str, int] = {}
    for max_tokens in (4, 9):
        r = sdk.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=max_tokens)
        prompt, completion = prompt + r.usage.prompt_tokens, completion + r.usage.completion_tokens
        reasons[r.choices[0].finish_reason] = reasons.get(r.choices[0].finish_reason, 0) + 1
    stream = sdk.chat.completions.create(
        model=MODEL, messages=FRANCE, temperature=0, max_tokens=6, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    for chunk in stream:
        if chunk.choices and chunk.choices[0].finish_reason:
            reasons[chunk.choices[0].finish_reason] = reasons.get(chunk.choices[0].finish_reason, 0) + 1
        if chunk.usage:
            prompt, completion = (
                prompt + chunk.usage.prompt_tokens,
                completion + chunk.usage.completion_tokens,
            )
    c = sdk.completions.create(model=MODEL, prompt="Once upon a time", temperature=0, max_tokens=5)
    prompt, completion = prompt + c.usage.prompt_tokens, completion + c.usage.completion_tokens
    reasons[c.choices[0].finish_reason] = reasons.get(c.choices[0].finish_reason, 0) + 1
    e = sdk.chat.completions.create(model=ECHO, messages=FRANCE, max_tokens=3)
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(model="no-such-model", messages=FRANCE)
    requests = 4

    deadline = time.monotonic() + 15  # nodes put a snapshot every second
    while True:
        s = scrape(url)
        if value(s, "chatbus:generation_tokens_total", model_name=MODEL) == completion and value(
            s, "chatbus:request_success_total", model_name=ECHO
        ):
            break
        assert time.monotonic() < deadline, f"generation tokens never reached {completion}"
        time.sleep(0.2)

    m = {"model_name": MODEL}
    assert value(s, "chatbus:prompt_tokens_total", **m) == prompt
    for reason, n in reasons.items():
        assert value(s, "chatbus:request_success_total", finished_reason=reason, **m) == n
    assert value(s, "chatbus:request_success_total", **m) == requests
    assert value(s, "chatbus:request_failure_total", **m) == 0
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_decode_time_seconds"):
        assert value(s, f"chatbus:{name}_count", **m) == requests, name
        assert value(s, f"chatbus:{name}_bucket", le="+Inf", **m) == requests, name
        assert value(s, f"chatbus:{name}_sum", **m) > 0, name
    # the engine's own timings: one queue and one prefill time per request
    for name in ("request_queue_time_seconds", "request_prefill_time_seconds"):
        assert value(s, f"chatbus:{name}_count", **m) == requests, name
        assert value(s, f"chatbus:{name}_sum", **m) > 0, name
    # one inter-token gap per token after each request's first
    assert value(s, "chatbus:inter_token_latency_seconds_count", **m) == completion - requests
    ttft = sorted(
        (float(dict(ls)["le"]), v)
        for (n, ls), v in s.items()
        if n.endswith("first_token_seconds_bucket") and ("model_name", MODEL) in ls
    )
    assert [v for _, v in ttft] == sorted(v for _, v in ttft)  # cumulative buckets
    assert value(s, "chatbus:num_requests_running", **m) == 0
    # the echo node: its own series, beside the real one
    assert value(s, "chatbus:generation_tokens_total", model_name=ECHO) == e.usage.completion_tokens
    assert value(s, "chatbus:request_success_total", model_name=ECHO) == 1
    assert {dict(ls)["node"] for (n, ls) in s if n == "chatbus:prompt_tokens_total"} >= {echo.service.node_id}  # type: ignore[union-attr]
    # the fleet and this gateway
    assert value(s, "chatbus:nodes_up", model_name=MODEL) == 1
    assert value(s, "chatbus:nodes_up", model_name=ECHO) == 1
    chat = {"route": "/v1/chat/completions"}
    assert value(s, "chatbus:http_requests_total", status="200", **chat) == 4
    assert value(s, "chatbus:http_requests_total", status="404", **chat) == 1
    assert value(s, "chatbus:http_requests_total", route="/v1/completions", status="200") == 1
    assert value(s, "chatbus:gateway_active_streams") == 0


def test_a_second_scrape_grows_by_exactly_one_request(url: str) -> None:
    before = scrape(url)
    sdk = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
    r = sdk.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=3)
    m = {"model_name": MODEL}
    want = value(before, "chatbus:generation_tokens_total", **m) + r.usage.completion_tokens
    deadline = time.monotonic() + 15
    while value(after := scrape(url), "chatbus:generation_tokens_total", **m) != want:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert (
        value(after, "chatbus:e2e_request_latency_seconds_count", **m)
        == value(before, "chatbus:e2e_request_latency_seconds_count", **m) + 1
    )
    assert (
        value(after, "chatbus:prompt_tokens_total", **m)
        == value(before, "chatbus:prompt_tokens_total", **m) + r.usage.prompt_tokens
    )


def test_kv_cache_use_and_prefix_hits_come_from_the_engine(url: str) -> None:
    """A repeated conversation is found in the prefix cache; a running stream holds KV memory."""
    sdk = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
    m = {"model_name": MODEL}
    before = scrape(url)
    first = sdk.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=8)
    turn = [*FRANCE, {"role": "assistant", "content": first.choices[0].message.content}]
    turn.append({"role": "user", "content": "And of Italy?"})
    sdk.chat.completions.create(model=MODEL, messages=turn, temperature=0, max_tokens=2)
    queried = value(before, "chatbus:prefix_cache_queries_total", **m) + first.usage.prompt_tokens
    deadline = time.monotonic() + 15
    while value(after := scrape(url), "chatbus:prefix_cache_queries_total", **m) < queried:
        assert time.monotonic() < deadline, "prefix-cache queries never counted"
        time.sleep(0.2)
    hits = value(after, "chatbus:prefix_cache_hits_total", **m) - value(
        before, "chatbus:prefix_cache_hits_total", **m
    )
    assert hits >= 16  # the second turn starts from the first one's keys/values, whole blocks of them
    assert value(after, "chatbus:prefix_cache_queries_total", **m) >= value(
        after, "chatbus:prefix_cache_hits_total", **m
    )

    seen: list[float] = []
    stream = sdk.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me a long story."}], max_tokens=400,
        temperature=0, stream=True,
    )  # fmt: skip
    for _ in stream:
        seen.append(value(scrape(url), "chatbus:kv_cache_usage_perc", **m))
        if seen[-1] > 0:
            break
    stream.close()
    assert 0 < seen[-1] <= 1, seen[-10:]
    deadline = time.monotonic() + 15
    while value(scrape(url), "chatbus:kv_cache_usage_perc", **m) != 0:  # nothing runs: released
        assert time.monotonic() < deadline, "KV-cache use stayed above 0 with nothing running"
        time.sleep(0.2)


def test_top_shows_the_nodes_live(url: str, nats_url: str, echo: EchoNode) -> None:
    """`chatbus top` in a pty: both nodes with their models; the real one's finished requests."""
    top = pexpect.spawn(
        sys.executable, ["-m", "chatbus", "top", "--nats", nats_url, "--interval", "0.3"],
        cwd=str(ROOT), env={**os.environ, "COLUMNS": "160"}, encoding="utf-8", timeout=20, dimensions=(40, 160),
    )  # fmt: skip
    try:
        top.expect(MODEL)
        top.expect("chatbus top")  # a second frame: it refreshes
        top.expect("chatbus top")
        frame = top.before  # one whole frame
        assert ECHO in frame and echo.service.node_id[:34] in frame  # type: ignore[union-attr]
        row = next(line for line in frame.splitlines() if line.startswith(MODEL))
        done = int(row.split()[-3])  # DONE FAIL GEN TOK
        assert done >= 4, row
        assert "REQ/S" in frame and "KV" in frame and "PREFIX" in frame
        top.sendintr()
        top.expect(pexpect.EOF)
    finally:
        top.close(force=True)
    assert top.exitstatus == 130 or top.signalstatus is not None


def _json_lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def test_request_id_travels_to_the_node_and_back_in_json_logs(url: str, logs: Path) -> None:
    rid = "trace-7f3a-0001"
    body = {"model": MODEL, "messages": FRANCE, "max_tokens": 3, "temperature": 0}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"X-Request-ID": rid}, timeout=60)
    assert r.status_code == 200 and r.headers["X-Request-ID"] == rid
    made = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).headers["X-Request-ID"]
    assert len(made) == 32 and made != rid
    bad = httpx.get(f"{url}/health", headers={"X-Request-ID": "no spaces allowed"}).headers["X-Request-ID"]
    assert bad != "no spaces allowed"

    def node_line() -> dict[str, object] | None:
        return next(
            (
                x
                for x in _json_lines(logs / "node.log")
                if x.get("request_id") == rid and "finish_reason" in x
            ),
            None,
        )

    deadline = time.monotonic() + 10
    while (line := node_line()) is None:
        assert time.monotonic() < deadline, (logs / "node.log").read_text()[-2000:]
        time.sleep(0.1)
    assert line["model"] == MODEL and str(line["node"]).startswith(socket.gethostname()[:8])
    assert line["completion_tokens"] == r.json()["usage"]["completion_tokens"]
    assert line["level"] == "info" and line["logger"] == "node.metrics"
    gateway = [x for x in _json_lines(logs / "gateway.log") if x.get("request_id") == rid]
    assert any(x["model"] == MODEL and "/v1/chat/completions" in str(x["message"]) for x in gateway), gateway


def test_the_grafana_dashboard_charts_only_exported_metrics(url: str) -> None:
    text = (ROOT / "docs" / "grafana-dashboard.json").read_text()
    exprs = [t["expr"] for p in json.loads(text)["panels"] for t in p["targets"]]
    used = {
        re.sub(r"_(bucket|total|count|sum)$", "", m) for e in exprs for m in re.findall(r"chatbus:\w+", e)
    }
    families = {f.name for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)}
    assert len(used) >= 15 and used <= families, used - families
