"""Stream one answer into the transcript: Markdown as it comes, then stats, stop, failover and errors."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

from textual.widgets import Markdown

from bus import BusError, ChatStream, Chunk, Code, Done, Failed, ModelNotFound, NoNodeAvailable
from bus import readable_tool_calls as readable
from tui.widgets import Answer, PromptInput, UserTurn

if TYPE_CHECKING:
    from tui.app import ChatApp

__all__ = ["stats_line", "stream_answer"]

_HINT = "pick another model with F2 or !!model NAME"


def stats_line(stream: ChatStream, done: Done, elapsed_s: float) -> str:
    """What the finished answer shows: who answered, token counts, speed, why it ended."""
    usage = done.usage
    speed = usage.completion_tokens / elapsed_s if elapsed_s > 0 else 0.0
    nodes = " → ".join(stream.nodes_used) or stream.node_id or "?"
    ended = {"stop": "", "length": " · stopped at max tokens", "cancelled": " · stopped"}[done.finish_reason]
    mark = "■" if done.finish_reason == "cancelled" else "✓"
    return (
        f"{mark} {stream.request.model} · node {nodes} · {usage.prompt_tokens} prompt + "
        f"{usage.completion_tokens} completion tokens · {speed:.1f} tok/s{ended}"
    )


async def stream_answer(app: ChatApp, answer: Answer) -> None:
    conv, client = app.conv, app.client
    if client is None:
        await _give_back(
            app, answer, "not connected to the bus yet; wait until the status line shows a model"
        )
        return
    if not conv.model:
        await _give_back(app, answer, "no model to ask: no node is on the bus yet (F2 shows the live list)")
        return
    problems = conv.params().problems()
    if problems:
        await _give_back(app, answer, "; ".join(problems) + " (fix it in the settings, F2)")
        return
    stream = client.chat(conv.model, conv.request_messages(), conv.params())
    app.stream = stream
    md = Markdown.get_stream(answer.markdown)
    final: Done | Failed | None = None
    started = time.monotonic()
    first: float | None = None
    tokens = 0
    ended: float | None = None
    try:
        try:
            await stream.start()
        except (ModelNotFound, NoNodeAvailable) as e:
            await _give_back(app, answer, f"{e.message}; {_HINT}")
            return
        except BusError as e:
            await _give_back(app, answer, e.message)
            return
        if app.stop_requested:
            await stream.cancel()
        answer.set_status(f"● generating on {stream.node_id}… Esc stops", generating=True)
        seen = 1
        async for event in stream:
            if len(stream.nodes_used) > seen:
                app.notice(
                    f"node {stream.nodes_used[seen - 1]} went away mid-answer; "
                    f"the answer continues on node {stream.nodes_used[-1]}",
                    "warning",
                )
                seen = len(stream.nodes_used)
            if isinstance(event, Chunk):
                first = first or time.monotonic()
                tokens += event.tokens
                if event.text:
                    await md.write(event.text)
                answer.set_status(
                    f"● generating… {tokens} tokens from {stream.node_id} — Esc stops", generating=True
                )
            else:
                final = event
                ended = time.monotonic()
    except asyncio.CancelledError:
        final = None  # a second Esc: stop listening now
    except Exception as e:  # the bus went away under us: keep what was shown, say what happened
        app.notice(f"the answer broke off: {e}", "error")
    finally:
        with contextlib.suppress(Exception):
            await md.stop()
        app.stream = None
        await asyncio.shield(stream.aclose())
    _finish(app, answer, stream, final, (ended or time.monotonic()) - (first or started))


def _finish(
    app: ChatApp, answer: Answer, stream: ChatStream, final: Done | Failed | None, took: float
) -> None:
    text = stream.text
    answer.text = text
    shown = readable(text)
    if shown != text:  # a JSON answer or tool calls: show them formatted once the answer is whole
        answer.markdown.update(shown)
    if text:
        app.conv.add_assistant(text)
    if isinstance(final, Done):
        answer.set_status(stats_line(stream, final, took))
        return
    if isinstance(final, Failed):
        if final.code == Code.NODE_LOST.value or final.code == Code.SHUTTING_DOWN.value:
            why = f"node {final.node_id or stream.node_id} died mid-answer and no other node could continue"
        else:
            why = f"the node failed: {final.message} ({final.code})"
        kept = "; what was shown is kept" if text else ""
        app.notice(f"{why}{kept}. !!regen asks again.", "error")
        answer.set_status(f"✗ {why}")
        return
    answer.set_status("■ stopped" + (f" · {stream.node_id}" if stream.node_id else ""))


async def _give_back(app: ChatApp, answer: Answer, message: str) -> None:
    """Nothing was answered: undo the turn and put the question back into the input."""
    text = ""
    if app.conv.messages and app.conv.messages[-1].role == "user":
        text = app.conv.messages.pop().content
    turns = app.transcript.query(UserTurn)
    to_remove: list[Answer | UserTurn] = [answer]
    if turns and turns.last().text == text:
        to_remove.append(turns.last())
    await app.transcript.remove_children(to_remove)
    prompt = app.query_one(PromptInput)
    if text and not prompt.text:
        prompt.set_text(text)
        message += " — your message is back in the input"
    app.notice(message, "error")
