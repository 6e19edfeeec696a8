"""Helpers shared by the TUI tests (no tests here): an in-process echo node, pilot waits, transcript reads."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from textual.pilot import Pilot

from tui.app import ChatApp
from tui.config import ChatConfig
from tui.widgets import Answer, Notice, PromptInput, UserTurn


def make_app(url: str, tmp: Path, **options: object) -> ChatApp:
    return ChatApp(ChatConfig(url=url, cwd=tmp, tick_s=0.2, **options))  # type: ignore[arg-type]


async def until(pilot: Pilot, predicate: Callable[[], object], timeout: float = 15.0, what: str = "") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            app = pilot.app
            raise AssertionError(f"timed out waiting for {what or predicate}; transcript:\n{transcript(app)}")
        await pilot.pause(0.05)


async def type_line(pilot: Pilot, text: str, typed: bool = False) -> None:
    """Put `text` in the prompt and press Enter; `typed` presses every key (slow: a frame a key)."""
    prompt = pilot.app.query_one(PromptInput)
    prompt.focus()
    if typed:
        await pilot.press(*["space" if c == " " else c for c in text])
    else:
        prompt.set_text(text)
    await pilot.press("enter")
    await pilot.pause()


async def ask(pilot: Pilot, text: str, timeout: float = 30.0) -> Answer:
    """Send a question and wait for its answer to finish."""
    app: ChatApp = pilot.app  # type: ignore[assignment]
    before = len(answers(app))
    await type_line(pilot, text)
    await until(
        pilot, lambda: len(answers(app)) > before and not app.generating, timeout, f"answer to {text!r}"
    )
    return answers(app)[-1]


def answers(app: ChatApp) -> list[Answer]:
    return list(app.transcript.query(Answer))


def users(app: ChatApp) -> list[str]:
    return [t.text for t in app.transcript.query(UserTurn)]


def notices(app: ChatApp, kind: str | None = None) -> list[str]:
    return [n.text for n in app.transcript.query(Notice) if kind is None or n.kind == kind]


def transcript(app: object) -> str:
    lines = []
    for w in app.transcript.children:  # type: ignore[attr-defined]
        if isinstance(w, UserTurn):
            lines.append(f"USER: {w.text}")
        elif isinstance(w, Answer):
            lines.append(f"ANSWER: {w.text!r} [{w.status_text}]")
        elif isinstance(w, Notice):
            lines.append(f"NOTICE({w.kind}): {w.text}")
    return "\n".join(lines)
