"""The soak's clients (bench/chaos.py): greedy requests with known answers checked exactly, hang-ups
resumed with Last-Event-ID on any gateway, and hostile requests that must get a clear 4xx.

Every outcome is one word, counted by the soak: `ok`, `wrong` (text differs from the undisturbed
answer), `failed` (an HTTP error or SSE error event with an OpenAI envelope: clear), `hung` (no end
within the timeout), `broken` (a body that ended with neither [DONE] nor an error, not resumable);
hostile ones `rejected` (4xx with an envelope), `served` (200 where allowed), `error5xx` (a 5xx that
was not 503/504: a bug), `hung`.
"""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass, field
from typing import Any

import httpx

PROMPTS = [
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "Write one sentence about the sea.",
    "What is two plus two?",
    "Give a short tip for learning to cook.",
    "Describe a cat in one sentence.",
    "What colour is the sky on a clear day?",
    "Name a planet in our solar system.",
    "Why do birds fly south in winter?",
    "Write a haiku about rain.",
    "What do bees make?",
    "Tell me one fact about the moon.",
]
# A greedy answer is exact across batch shapes only where the top two tokens of every step are
# farther apart than a different batch shape, prefix-cache hit or continuation prefill can move them:
# prompts whose undisturbed answer has a closer pair (in nats) anywhere are not used. The one flip
# seen in 10-minute float32 soaks was on an answer whose closest pair is 0.045 apart; 0.1 leaves a
# factor of two (bf16 moves logits far more: raise it, or run the nodes in float32 as by default).
TIE_MARGIN = 0.1


@dataclass
class Spec:
    prompt: int
    chat: bool
    stream: bool
    hangup: int = 0  # hang up after this many content events, then resume (0: never)
    slow: bool = False  # read the stream slowly


@dataclass
class Result:
    outcome: str
    resumed: int = 0  # resumes this answer took (hang-ups and dead gateways)
    detail: str = ""


@dataclass
class Load:
    gateways: list[str]  # base URLs; a dead one is skipped as a load balancer would
    model: str
    max_tokens: int
    timeout_s: float
    references: dict[tuple[int, bool], str] = field(default_factory=dict)
    # Smallest gap (nats) between the top two tokens over each reference answer's steps.
    margins: dict[tuple[int, bool], float] = field(default_factory=dict)
    usable: list[tuple[int, bool]] = field(default_factory=list)  # (prompt, chat) with no near tie

    def body(self, spec: Spec) -> dict[str, Any]:
        text = PROMPTS[spec.prompt]
        body: dict[str, Any] = {"model": self.model, "temperature": 0, "max_tokens": self.max_tokens}
        body.update({"messages": [{"role": "user", "content": text}]} if spec.chat else {"prompt": text})
        return {**body, "stream": spec.stream}

    async def run(self, http: httpx.AsyncClient, spec: Spec) -> Result:
        try:
            return await asyncio.wait_for(self._run(http, spec), self.timeout_s)
        except TimeoutError:
            return Result("hung", detail=f"{spec}")

    async def _run(self, http: httpx.AsyncClient, spec: Spec) -> Result:
        path = "/v1/chat/completions" if spec.chat else "/v1/completions"
        lost = 0
        for _ in range(3):
            for base in random.sample(self.gateways, len(self.gateways)):
                try:
                    if not spec.stream:
                        r = await http.post(base + path, json=self.body(spec))
                        result = self._judge_whole(spec, r)
                    else:
                        result = await self._stream(http, base, path, spec)
                    result.resumed += lost
                    return result
                except httpx.ConnectError:
                    continue  # that gateway is down: the next one, before anything was asked
                except httpx.TransportError:
                    lost += 1  # it died with our request and nothing came back: ask another
            await asyncio.sleep(1)
        return Result("failed", lost, "no gateway took the request (all down)")

    def _judge_whole(self, spec: Spec, r: httpx.Response) -> Result:
        if r.status_code != 200:
            return _error_result(r.status_code, r.text)
        choice = r.json()["choices"][0]
        text = choice["message"]["content"] if spec.chat else choice["text"]
        return self._judge_text(spec, text, 0)

    def _judge_text(self, spec: Spec, text: str, resumed: int) -> Result:
        want = self.references[(spec.prompt, spec.chat)]
        if text == want:
            return Result("ok", resumed)
        return Result("wrong", resumed, f"{spec}: got {text!r}, want {want!r}")

    async def _stream(self, http: httpx.AsyncClient, base: str, path: str, spec: Spec) -> Result:
        text: list[str] = []
        last_id, resumed, events = "", 0, 0
        request = http.build_request("POST", base + path, json=self.body(spec))
        while True:
            down = ""  # the gateway that just failed us, skipped for the resume
            try:
                r = await http.send(request, stream=True)
                try:
                    if r.status_code != 200:
                        await r.aread()
                        return _error_result(r.status_code, r.text)
                    async for ident, data in _sse(r):
                        if data == "[DONE]":
                            return self._judge_text(spec, "".join(text), resumed)
                        body = json.loads(data)
                        if "error" in body:
                            return _error_result(503, json.dumps(body))
                        last_id = ident or last_id
                        delta = body["choices"][0] if body.get("choices") else {}
                        piece = (delta.get("delta") or {}).get("content") if spec.chat else delta.get("text")
                        if piece:
                            text.append(piece)
                            events += 1
                        if spec.slow:
                            await asyncio.sleep(0.3)
                        if spec.hangup and events == spec.hangup and not resumed:
                            break  # hang up mid-answer, and come back below
                finally:
                    await r.aclose()
            except httpx.TransportError as e:
                if not last_id:
                    raise  # nothing came back: ask again, elsewhere
                if resumed >= 4:
                    return Result("broken", resumed, f"{spec}: {e!r} after {resumed} resumes")
                down = base
                await asyncio.sleep(0.5)  # its gateway died: resume on another, as a load balancer would
            if not last_id:
                return Result("broken", resumed, f"{spec}: the body ended with no event id")
            resumed += 1
            completion_id = last_id.rpartition(":")[0]
            base = random.choice([g for g in self.gateways if g != down] or self.gateways)
            request = http.build_request(
                "GET", f"{base}{path}/{completion_id}/stream", headers={"Last-Event-ID": last_id}
            )


def margin_of(choice: dict[str, Any], chat: bool) -> float:
    """The smallest top-1 minus top-2 logprob over the steps of one answer (inf without logprobs:
    an engine that reports none, as the scripted echo engine, has no near ties to fear)."""
    logprobs = choice.get("logprobs") or {}
    if chat:
        steps = [
            [t["logprob"] for t in step.get("top_logprobs") or []] for step in logprobs.get("content") or []
        ]
    else:
        steps = [list(step.values()) for step in logprobs.get("top_logprobs") or [] if step]
    gaps = [top[0] - top[1] for top in (sorted(s, reverse=True) for s in steps) if len(top) >= 2]
    return min(gaps, default=float("inf"))


def _error_result(status: int, text: str) -> Result:
    try:
        clear = bool(json.loads(text)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        clear = False
    if not clear:
        return Result("broken", detail=f"{status} without an error envelope: {text[:200]}")
    return Result("failed", detail=f"{status}: {text[:200]}")


async def _sse(r: httpx.Response):  # type: ignore[no-untyped-def]
    ident = None
    async for line in r.aiter_lines():
        if line.startswith("id: "):
            ident = line[4:]
        elif line.startswith("data: "):
            yield ident, line[6:]
            ident = None


# ----------------------------------------------------------------------------- hostile requests

_ODD = "\u202e\u0301\U0001f600\ufeff\u00a0 \u4e2d\u6587 \U0001d54f\u200b"
HOSTILE: list[tuple[str, str, str, Any, dict[str, Any], bool]] = [
    # (name, method, path, body, headers, 200 allowed)
    (
        "huge model",
        "POST",
        "/v1/chat/completions",
        {"model": "x" * 10_000, "messages": [{"role": "user", "content": "hi"}]},
        {},
        False,
    ),
    (
        "empty model",
        "POST",
        "/v1/chat/completions",
        {"model": "", "messages": [{"role": "user", "content": "hi"}]},
        {},
        False,
    ),
    ("control in model", "POST", "/v1/completions", {"model": "a\u0000b\nc", "prompt": "hi"}, {}, False),
    (
        "odd unicode",
        "POST",
        "/v1/chat/completions",
        {"model": "$MODEL", "max_tokens": 4, "messages": [{"role": "user", "content": _ODD}]},
        {},
        True,
    ),
    (
        "odd unicode name",
        "POST",
        "/v1/chat/completions",
        {"model": _ODD, "messages": [{"role": "user", "content": "hi"}]},
        {},
        False,
    ),
    (
        "negative max_tokens",
        "POST",
        "/v1/completions",
        {"model": "$MODEL", "prompt": "hi", "max_tokens": -5},
        {},
        False,
    ),
    (
        "string temperature",
        "POST",
        "/v1/completions",
        {"model": "$MODEL", "prompt": "hi", "temperature": "hot"},
        {},
        False,
    ),
    (
        "huge n",
        "POST",
        "/v1/chat/completions",
        {"model": "$MODEL", "n": 10_000, "messages": [{"role": "user", "content": "hi"}]},
        {},
        False,
    ),
    (
        "unknown field",
        "POST",
        "/v1/chat/completions",
        {"model": "$MODEL", "evil": 1, "messages": []},
        {},
        False,
    ),
    ("garbage json", "POST", "/v1/chat/completions", b"{\xff\xfe not json", {}, False),
    ("deep json", "POST", "/v1/completions", b"[" * 100_000, {}, False),
    (
        "oversized body",
        "POST",
        "/v1/completions",
        b'{"model": "m", "prompt": "' + b"a" * 3_000_000 + b'"}',
        {},
        False,
    ),
    (
        "huge header",
        "POST",
        "/v1/chat/completions",
        {"model": "$MODEL", "messages": []},
        {"X-Junk": "j" * 60_000},
        False,
    ),
    ("huge name in path", "GET", "/v1/models/" + "m" * 10_000, None, {}, False),
    (
        "unknown resume",
        "GET",
        "/v1/chat/completions/chatcmpl-" + "0" * 32 + "/stream",
        None,
        {"Last-Event-ID": "x:1"},
        False,
    ),
    (
        "malformed resume",
        "GET",
        "/v1/completions/cmpl-%00%ff/stream",
        None,
        {"Last-Event-ID": b"\xff" * 5000},
        False,
    ),
    ("huge resume id", "GET", "/v1/chat/completions/chatcmpl-" + "a" * 10_000 + "/stream", None, {}, False),
]


async def hostile(http: httpx.AsyncClient, gateways: list[str], model: str, timeout_s: float) -> tuple[str, str]:  # fmt: skip
    """(name, outcome) of one hostile request chosen at random."""
    name, method, path, body, headers, allowed = random.choice(HOSTILE)
    if isinstance(body, dict):
        body = json.dumps({k: model if v == "$MODEL" else v for k, v in body.items()}).encode()
    base = random.choice(gateways)
    try:
        r = await asyncio.wait_for(
            http.request(method, base + path, content=body, headers=headers), timeout_s
        )
    except TimeoutError:
        return name, "hung"
    except httpx.ConnectError:
        return name, "gateway_down"
    except httpx.TransportError:
        return name, "rejected"  # the HTTP server refused to parse it (oversized header) and hung up
    if r.status_code == 200 and allowed:
        return name, "served"
    if r.status_code in (503, 504):
        return name, "gateway_busy"
    if 400 <= r.status_code < 500:
        try:
            ok = bool(r.json()["error"]["message"]) or r.status_code == 431
        except (ValueError, KeyError, TypeError):
            ok = r.status_code in (400, 413, 431)  # uvicorn's own answer to an unparsable request
        return name, "rejected" if ok else "error5xx"
    return name, "error5xx" if r.status_code >= 500 else f"unexpected{r.status_code}"
