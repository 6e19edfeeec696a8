"""Regression tests for the terminal chat's keys, panel focus, regen placement and sampling ranges (issue 18)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fakes import EchoEngine, echo_node
from test_tui_support import answers, ask, make_app, notices, type_line, until
from textual.events import Key, Paste
from textual.widgets import Input

from tui.settings import Settings
from tui.widgets import Answer, Notice, PromptInput, UserTurn

ROOT = Path(__file__).resolve().parent.parent


async def test_hiding_the_settings_gives_the_keys_back_to_the_input(nats_url: str, tmp_path: Path) -> None:
    async with echo_node(nats_url, EchoEngine("echo-f")):
        app = make_app(nats_url, tmp_path)
        async with app.run_test(size=(130, 40)) as pilot:
            await until(pilot, lambda: app.conv.model == "echo-f")
            await pilot.press("f2")
            await pilot.click("#top_p")
            assert app.focused is app.query_one("#top_p", Input)
            await pilot.press("f2")
            assert "-shown" not in app.query_one(Settings).classes
            await pilot.press("h", "i")
            assert app.query_one(PromptInput).text == "hi"
            assert app.query_one("#top_p", Input).value == "1.0" and app.conv.top_p == 1.0


async def test_regen_after_help_answers_under_its_question(nats_url: str, tmp_path: Path) -> None:
    async with echo_node(nats_url, EchoEngine("echo-h")):
        app = make_app(nats_url, tmp_path)
        async with app.run_test(size=(110, 40)) as pilot:
            await until(pilot, lambda: app.conv.model == "echo-h")
            await ask(pilot, "one two")
            await type_line(pilot, "!!help")
            await type_line(pilot, "!!regen")
            await until(pilot, lambda: not app.generating and answers(app) and answers(app)[-1].text)
            kinds = [type(w) for w in app.transcript.children]
            asked = kinds.index(UserTurn)
            assert kinds[asked:] == [UserTurn, Answer, Notice], kinds  # the answer, then the help
            assert answers(app)[-1].text == "one two" and len(answers(app)) == 1


async def test_a_burst_of_keys_keeps_ctrl_j_newlines_in_place(nats_url: str, tmp_path: Path) -> None:
    app = make_app(nats_url, tmp_path, autostart=False)
    async with app.run_test(size=(110, 40)) as pilot:
        prompt = app.query_one(PromptInput)
        prompt.focus()
        await pilot.pause()
        # All queued before any is handled, as a paste arrives from a terminal without bracketed paste.
        for key, char in [("a", "a"), ("b", "b"), ("ctrl+j", "\n"), ("c", "c"), ("ctrl+j", "\n"), ("d", "d")]:
            app.post_message(Key(key, char))
        await until(pilot, lambda: prompt.text.count("\n") == 2 and "d" in prompt.text)
        assert prompt.text == "ab\nc\nd"
        assert not app.conv.messages  # nothing was sent


async def test_bracketed_paste_inserts_lines_without_sending(nats_url: str, tmp_path: Path) -> None:
    app = make_app(nats_url, tmp_path, autostart=False)
    async with app.run_test(size=(110, 40)) as pilot:
        prompt = app.query_one(PromptInput)
        prompt.focus()
        app.post_message(Paste("first line\nsecond line\n"))  # as the driver posts it
        await until(pilot, lambda: "second" in prompt.text)
        assert prompt.text == "first line\nsecond line\n" and not app.conv.messages


async def test_page_keys_scroll_the_transcript_while_typing_and_esc_clears(
    nats_url: str, tmp_path: Path
) -> None:
    async with echo_node(nats_url, EchoEngine("echo-k", step_s=0.001)):
        app = make_app(nats_url, tmp_path)
        async with app.run_test(size=(80, 24)) as pilot:
            await until(pilot, lambda: app.conv.model == "echo-k")
            for i in range(6):
                await ask(pilot, " ".join(f"line{i}-{j}" for j in range(40)))
            await pilot.pause(0.3)
            transcript = app.transcript
            bottom = transcript.scroll_y
            assert bottom > 0 and transcript.max_scroll_y == bottom
            prompt = app.query_one(PromptInput)
            await pilot.press(*"draft")
            await pilot.press("pageup")
            await until(pilot, lambda: transcript.scroll_y < bottom, what="the transcript to scroll up")
            assert app.focused is prompt and prompt.text == "draft"
            await pilot.press("pagedown")
            await until(pilot, lambda: transcript.scroll_y == bottom, what="the transcript to scroll down")
            await pilot.press("escape")  # nothing is answering: Esc clears the input
            assert prompt.text == ""


async def test_copy_puts_the_last_answer_on_the_clipboard(nats_url: str, tmp_path: Path) -> None:
    async with echo_node(nats_url, EchoEngine("echo-y")):
        app = make_app(nats_url, tmp_path)
        async with app.run_test(size=(110, 40)) as pilot:
            await until(pilot, lambda: app.conv.model == "echo-y")
            await type_line(pilot, "!!copy")
            assert "nothing to copy" in notices(app, "warning")[-1]
            await ask(pilot, "copy these words")
            await type_line(pilot, "!!copy")
            assert app.clipboard == "copy these words"
            assert "copied the last answer (16 characters)" in notices(app)[-1]


async def test_out_of_range_sampling_is_refused_before_sending(nats_url: str, tmp_path: Path) -> None:
    bad = tmp_path / "hot.json"
    bad.write_text(json.dumps({"params": {"temperature": 9}, "messages": [{"role": "user", "content": "x"}]}))
    async with echo_node(nats_url, EchoEngine("echo-t")):
        app = make_app(nats_url, tmp_path, repetition_penalty=1.3)
        async with app.run_test(size=(130, 40)) as pilot:
            await until(pilot, lambda: app.conv.model == "echo-t")
            await type_line(pilot, f"!!load {bad.name}")
            assert "temperature must be between 0 (greedy) and 2, got 9" in notices(app, "error")[-1]
            assert app.conv.temperature == 0.7 and not app.conv.messages
            await pilot.press("f2")
            box = app.query_one("#repetition_penalty", Input)
            assert box.value == "1.3" and app.conv.params().repetition_penalty == 1.3
            box.value = "0"
            await pilot.pause()
            assert "-invalid" in box.classes and "repetition_penalty must be above 0" in str(box.tooltip)
            app.conv.temperature = 5.0  # however it got there, it is not sent
            await type_line(pilot, "hello")
            await until(pilot, lambda: notices(app, "error"))
            assert "temperature must be between 0 (greedy) and 2, got 5.0" in notices(app, "error")[-1]
            assert not answers(app) and app.query_one(PromptInput).text == "hello"


def test_flags_out_of_range_exit_with_the_rule() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "chatbus", "chat", "--nats", "nats://127.0.0.1:1", "--temperature", "5", "hi"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "temperature must be between 0 (greedy) and 2, got 5.0" in proc.stderr
