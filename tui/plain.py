"""Plain mode for pipes and scripts: read the question from stdin, print the answer, nothing else."""

from __future__ import annotations

import asyncio
import sys

from bus import BusClient, BusError, Chunk, Failed, redact
from tui.config import ChatConfig
from tui.conversation import Conversation

__all__ = ["run_plain"]


async def _pick_model(client: BusClient, wanted: str | None) -> str:
    for _ in range(10):  # right after a node starts, its first heartbeat may not be in yet
        if client.models():
            break
        await asyncio.sleep(0.2)
    return wanted or next(iter(sorted(client.models())), "")


async def run_plain(cfg: ChatConfig, question: str) -> int:
    """Exit 0 with the answer on stdout; 1 with one `error: ...` line on stderr (2: bad flags)."""
    problems = cfg.problems()
    if problems:
        print(f"error: {'; '.join(problems)}", file=sys.stderr)
        return 2
    if not question.strip():
        print("error: nothing to ask: pipe a question into stdin", file=sys.stderr)
        return 1
    try:
        client = await BusClient.connect(cfg.url, name="chatbus-tui-plain")
    except BusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        model = await _pick_model(client, cfg.model)
        if not model:
            print(
                f"error: no model is served on {redact(cfg.url)}; start one with `chatbus up`",
                file=sys.stderr,
            )
            return 1
        conv = Conversation(model=model, system=cfg.system, temperature=cfg.temperature, top_p=cfg.top_p)
        conv.max_tokens = cfg.max_tokens
        conv.repetition_penalty = cfg.repetition_penalty
        conv.add_user(question.strip())
        stream = client.chat(model, conv.request_messages(), conv.params())
        try:
            async for event in stream:
                if isinstance(event, Chunk):
                    sys.stdout.write(event.text)
                    sys.stdout.flush()
                elif isinstance(event, Failed):
                    print(f"\nerror: {event.message} ({event.code})", file=sys.stderr)
                    return 1
        except BusError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        finally:
            await stream.aclose()
        sys.stdout.write("\n")
        sys.stdout.flush()
        return 0
    finally:
        await client.close()
