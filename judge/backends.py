"""Who judges: a model on the bus (BusClient) or any OpenAI-compatible endpoint (the `openai` SDK)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Protocol

import openai

from bus import (
    BusClient,
    BusError,
    BusUnavailable,
    ChatMessage,
    Code,
    Constraint,
    Done,
    Failed,
    ModelNotFound,
    NodeBusy,
    NodeTimeout,
    NoNodeAvailable,
    SamplingParams,
    error_for,
    json_schema_constraint,
)
from judge.verdicts import Verdict, verdict_instruction, verdict_schema, verdict_text

__all__ = ["BusJudge", "JudgeBackend", "JudgeFailure", "OpenAIJudge", "ask_bus", "make_judge"]

BUSY_RETRIES = 20


class JudgeFailure(Exception):
    """A judge (or answering model) call that produced no text; `kind` is what gets counted."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # timeout | unreachable | rejected | error


class JudgeBackend(Protocol):
    name: str

    async def ask(self, system: str, user: str, verdict: Verdict | None = None) -> str:
        """The judgment text; `verdict` says which bracketed verdict it must contain."""
        ...

    async def aclose(self) -> None: ...


def _kind_of(e: BusError) -> str:
    if isinstance(e, ModelNotFound | NoNodeAvailable | BusUnavailable):
        return "unreachable"
    if isinstance(e, NodeTimeout):
        return "timeout"
    return "rejected" if e.code in (Code.BAD_REQUEST, Code.CONTEXT_LENGTH) else "error"


async def ask_bus(
    client: BusClient,
    model: str,
    messages: list[ChatMessage],
    params: SamplingParams,
    timeout_s: float,
    constraint: Constraint | None = None,
) -> str:
    """One whole answer from a bus model; waits out busy nodes; raises JudgeFailure."""
    for attempt in range(BUSY_RETRIES + 1):
        stream = client.chat(model, messages, params, deadline_s=timeout_s, constraint=constraint)
        try:
            async with asyncio.timeout(timeout_s):
                await stream.start()
                async for event in stream:
                    if isinstance(event, Failed):
                        raise error_for(event.code, event.message)
                    if isinstance(event, Done):
                        return stream.text
            raise JudgeFailure("error", f"{model}: the stream ended without Done")
        except NodeBusy as e:
            if attempt == BUSY_RETRIES:
                raise JudgeFailure("timeout", f"{model}: every node stayed busy ({e})") from None
            await asyncio.sleep(min(5.0, e.retry_after_s or 1.0))
        except TimeoutError:
            raise JudgeFailure("timeout", f"{model}: no whole answer within {timeout_s:.0f}s") from None
        except BusError as e:
            raise JudgeFailure(_kind_of(e), f"{model}: {e}") from None
        finally:
            await stream.aclose()
    raise AssertionError("unreachable")


class BusJudge:
    """A judge served on the bus; greedy, so the same answers get the same verdict.

    Its verdicts are constrained to JSON (judge/verdicts.py), so every one of them parses.
    """

    def __init__(self, client: BusClient, model: str, max_tokens: int, timeout_s: float) -> None:
        self.client = client
        self.name = model
        self.params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
        self.timeout_s = timeout_s

    async def ask(self, system: str, user: str, verdict: Verdict | None = None) -> str:
        constraint = None
        if verdict is not None:
            user = f"{user}\n\n{verdict_instruction(verdict)}"
            schema = verdict_schema(verdict, self.params.max_tokens or 1024)
            constraint = json_schema_constraint(schema)
        messages = [ChatMessage(role="system", content=system), ChatMessage(role="user", content=user)]
        reply = await ask_bus(self.client, self.name, messages, self.params, self.timeout_s, constraint)
        return reply if verdict is None else verdict_text(reply, verdict)

    async def aclose(self) -> None:
        return None


class OpenAIJudge:
    """A judge behind an OpenAI-compatible endpoint (OpenAI, vLLM, the chatbus gateway, ...)."""

    def __init__(self, base_url: str, api_key: str, model: str, max_tokens: int, timeout_s: float) -> None:
        self.name = model
        self.base_url = base_url
        self.max_tokens = max_tokens
        self.sdk = openai.AsyncOpenAI(
            base_url=base_url, api_key=api_key or "none", timeout=timeout_s, max_retries=1
        )

    async def ask(self, system: str, user: str, verdict: Verdict | None = None) -> str:
        """`verdict` is not enforced here: any endpoint must work, JSON mode or not."""
        try:
            reply = await self.sdk.chat.completions.create(
                model=self.name,
                messages=[{"role": "system", "content": system}, {"role": "user", "content": user}],
                temperature=0.0,
                max_tokens=self.max_tokens,
            )
        except openai.APITimeoutError:
            raise JudgeFailure("timeout", f"{self.base_url}: the judge did not answer in time") from None
        except openai.APIConnectionError as e:
            raise JudgeFailure("unreachable", f"{self.base_url}: cannot connect ({e})") from None
        except openai.APIStatusError as e:
            kind = "unreachable" if e.status_code in (401, 403, 404) else "rejected"
            raise JudgeFailure(kind, f"{self.base_url}: HTTP {e.status_code}: {e.message}") from None
        if not reply.choices or reply.choices[0].message.content is None:
            raise JudgeFailure("error", f"{self.base_url}: the reply has no message content")
        return reply.choices[0].message.content

    async def aclose(self) -> None:
        await self.sdk.close()


def make_judge(
    client: BusClient,
    model: str,
    *,
    base_url: str = "",
    api_key_env: str = "",
    environ: Mapping[str, str] | None = None,
    max_tokens: int = 1024,
    timeout_s: float = 300.0,
) -> JudgeBackend:
    """The bus judge, or the endpoint judge when `base_url` is set (key from `environ[api_key_env]`)."""
    if not base_url:
        return BusJudge(client, model, max_tokens, timeout_s)
    key = ""
    if api_key_env:
        key = (environ or {}).get(api_key_env, "")
        if not key:
            raise ValueError(
                f"the judge endpoint's key should be in ${api_key_env} on the judge worker, which has no such "
                f"variable; export it where `python -m judge` runs"
            )
    return OpenAIJudge(base_url, key, model, max_tokens, timeout_s)
