"""The terminal chat app through Textual's pilot, on a real nats-server with in-process echo nodes."""

from __future__ import annotations

import json
from pathlib import Path

from fakes import EchoEngine, echo_node
from procs import eventually
from test_tui_support import answers, ask, make_app, notices, transcript, type_line, until, users
from textual.widgets import Input, Select

from bus.server import EmbeddedServer
from tui.settings import Settings
from tui.widgets import PromptInput

WORDS = " ".join(f"w{i}" for i in range(150))


async def test_question_streams_answer_with_stats(nats_url: str, tmp_path: Path) -> None:
    engine = EchoEngine("echo-a", step_s=0.2)
    async with echo_node(nats_url, engine) as node:
        app = make_app(nats_url, tmp_path)
        async with app.run_test(size=(110, 40)) as pilot:
            await until(pilot, lambda: app.conv.model == "echo-a", what="the model to be picked")
            await type_line(pilot, "alpha beta gamma delta epsilon zeta eta theta", typed=True)
            answer = answers(app)[-1]
            await until(pilot, lambda: "-generating" in answer.classes and answer.status_text.startswith("●"))
            await until(pilot, lambda: not app.generating)
            assert users(app) == ["alpha beta gamma delta epsilon zeta eta theta"]
            assert answer.text == "alpha beta gamma delta epsilon zeta eta theta"
            assert "theta" in answer.markdown.source
            assert "-generating" not in answer.classes
            status = answer.status_text
            assert f"node {node.node_id}" in status and "8 completion tokens" in status and "tok/s" in status
            assert [m.role for m in app.conv.messages] == ["user", "assistant"]


async def test_stop_mid_generation_keeps_what_was_shown(nats_url: str, tmp_path: Path) -> None:
    engine = EchoEngine("echo-s", step_s=0.05)
    async with echo_node(nats_url, engine) as node:
        app = make_app(nats_url, tmp_path)
        async with app.run_test(size=(110, 40)) as pilot:
            await until(pilot, lambda: app.conv.model == "echo-s")
            await type_line(pilot, WORDS)
            answer = answers(app)[-1]
            await until(pilot, lambda: app.stream is not None and len(app.stream.text.split()) >= 3)
            await pilot.press("escape")
            await until(pilot, lambda: not app.generating)
            shown = answer.text
            assert 3 <= len(shown.split()) < 150 and WORDS.startswith(shown)
            assert "stopped" in answer.status_text
            assert app.conv.messages[-1].content == shown  # kept, like FastChat
            await until(pilot, lambda: not node._jobs, what="the node to stop decoding")
            # Ctrl-C stops too.
            await type_line(pilot, WORDS)
            await until(pilot, lambda: app.stream is not None and app.stream.text)
            await pilot.press("ctrl+c")
            await until(pilot, lambda: not app.generating)
            assert "stopped" in answers(app)[-1].status_text
            assert app.is_running  # Ctrl-C stopped the answer, not the app


async def test_quitting_mid_answer_stops_it_on_the_node(nats_url: str, tmp_path: Path) -> None:
    engine = EchoEngine("echo-q", step_s=0.05)
    async with echo_node(nats_url, engine) as node:
        app = make_app(nats_url, tmp_path)
        async with app.run_test(size=(110, 40)) as pilot:
            await until(pilot, lambda: app.conv.model == "echo-q")
            await type_line(pilot, WORDS)
            await until(pilot, lambda: app.stream is not None and len(app.stream.text.split()) >= 3)
            steps = engine.steps
            await pilot.press("ctrl+q")
        await eventually(lambda: not node._jobs, timeout=15)
        assert (
            engine.steps - steps < 100
        )  # stopped within a few steps, not decoded to its end (150) for nobody


async def test_in_chat_commands(nats_url: str, tmp_path: Path) -> None:
    async with echo_node(nats_url, EchoEngine("echo-c")):
        app = make_app(nats_url, tmp_path)
        async with app.run_test(size=(110, 40)) as pilot:
            await until(pilot, lambda: app.conv.model == "echo-c")
            await ask(pilot, "one two")
            await ask(pilot, "three four")
            assert users(app) == ["one two", "three four"] and len(app.conv.messages) == 4

            await type_line(pilot, "!!help")
            assert any("!!regen" in n and "!!save FILE" in n for n in notices(app))

            await type_line(pilot, "!!remove")
            assert users(app) == ["one two"] and [m.content for m in app.conv.messages] == ["one two"] * 2
            assert len(answers(app)) == 1

            await type_line(pilot, "!!regen")
            await until(pilot, lambda: not app.generating and len(answers(app)) == 1)
            assert [m.content for m in app.conv.messages] == ["one two", "one two"]
            assert answers(app)[-1].text == "one two" and "completion tokens" in answers(app)[-1].status_text

            await type_line(pilot, "!!bogus")
            assert "unknown command !!bogus" in notices(app, "error")[-1]
            await type_line(pilot, "!!save")
            assert "!!save needs a FILE" in notices(app, "error")[-1]

            await type_line(pilot, "!!reset")
            assert app.conv.messages == [] and users(app) == [] and answers(app) == []
            await type_line(pilot, "!!regen")
            assert "nothing to regenerate" in notices(app, "warning")[-1]

            await type_line(pilot, "!!exit")
            await pilot.pause()
        assert app.return_code == 0


async def test_save_then_load_round_trips(nats_url: str, tmp_path: Path) -> None:
    async with echo_node(nats_url, EchoEngine("echo-l")):
        app = make_app(nats_url, tmp_path, system="be brief", temperature=0.0, max_tokens=64)
        async with app.run_test(size=(110, 40)) as pilot:
            await until(pilot, lambda: app.conv.model == "echo-l")
            await ask(pilot, "first question")
            await ask(pilot, "second ```code``` here")
            await type_line(pilot, "!!save chat.json")
            saved = json.loads((tmp_path / "chat.json").read_text())
            assert saved["model"] == "echo-l" and saved["system"] == "be brief"
            assert saved["params"] == {
                "temperature": 0.0,
                "top_p": 1.0,
                "max_tokens": 64,
                "repetition_penalty": 1.0,
            }
            assert [m["role"] for m in saved["messages"]] == ["user", "assistant"] * 2

            await type_line(pilot, "!!reset")
            app.query_one("#temperature", Input).value = "1.5"
            await until(pilot, lambda: app.conv.temperature == 1.5)
            await type_line(pilot, "!!load chat.json")
            assert users(app) == ["first question", "second ```code``` here"]
            assert [a.text for a in answers(app)] == ["first question", "second ```code``` here"]
            assert app.conv.temperature == 0.0 and app.conv.system == "be brief"
            assert app.query_one("#temperature", Input).value == "0.0"
            await type_line(pilot, "!!save again.json")
            assert json.loads((tmp_path / "again.json").read_text()) == saved

            await type_line(pilot, "!!load missing.json")
            assert "cannot read" in notices(app, "error")[-1]
            (tmp_path / "bad.json").write_text("{nope")
            await type_line(pilot, "!!load bad.json")
            assert "is not JSON" in notices(app, "error")[-1]
            # The conversation continues after a load.
            answer = await ask(pilot, "third")
            assert answer.text == "third" and len(app.conv.messages) == 6


async def test_model_picker_follows_nodes_and_switches(nats_url: str, tmp_path: Path) -> None:
    async with echo_node(nats_url, EchoEngine("echo-x")) as x:
        app = make_app(nats_url, tmp_path, model="echo-x")
        async with app.run_test(size=(130, 40)) as pilot:
            select = app.query_one("#model", Select)
            await until(pilot, lambda: "echo-x" in app.served)
            async with echo_node(nats_url, EchoEngine("echo-y")) as y:
                await until(pilot, lambda: "echo-y" in app.served, what="the new node in the list")
                assert select.value == "echo-x"
                assert {v for _, v in select._options if isinstance(v, str)} >= {"echo-x", "echo-y"}
                assert "node " + x.node_id in (await ask(pilot, "on x")).status_text

                await type_line(pilot, "!!model echo-y")
                assert app.conv.model == "echo-y" and select.value == "echo-y"
                answer = await ask(pilot, "on y")
                assert answer.text == "on y" and f"node {y.node_id}" in answer.status_text

                select.value = "echo-x"  # the picker, as a user would
                await until(pilot, lambda: app.conv.model == "echo-x")
                await type_line(pilot, "!!model nope")
                assert "no node serves 'nope'" in notices(app, "error")[-1]
                await type_line(pilot, "!!model echo-y")
            # echo-y's node left while it was the chosen model.
            await until(pilot, lambda: "echo-y" not in app.served, what="echo-y to leave the list")
            assert any("no node serves echo-y any more" in n for n in notices(app, "warning"))
            await type_line(pilot, "still there?")
            await until(pilot, lambda: not app.generating and "echo-y" in notices(app, "error")[-1])
            assert "is not served" in notices(app, "error")[-1]
            assert app.query_one(PromptInput).text == "still there?"  # given back to retry elsewhere
            assert users(app) == ["on x", "on y"] and len(app.conv.messages) == 4


async def test_node_dies_mid_answer_and_the_answer_continues(nats_url: str, tmp_path: Path) -> None:
    async with echo_node(nats_url, EchoEngine("echo-f", step_s=0.03)) as a:
        async with echo_node(nats_url, EchoEngine("echo-f", step_s=0.03)) as b:
            app = make_app(nats_url, tmp_path)
            async with app.run_test(size=(110, 40)) as pilot:
                await until(pilot, lambda: len(getattr(app.served.get("echo-f"), "nodes", [])) == 2)
                await type_line(pilot, WORDS)
                await until(pilot, lambda: app.stream is not None and len(app.stream.text.split()) >= 3)
                first = app.stream.node_id  # type: ignore[union-attr]
                doomed = a if first == a.node_id else b
                await doomed.drain(timeout=0)
                await until(pilot, lambda: not app.generating, timeout=30)
                assert answers(app)[-1].text.split() == WORDS.split(), transcript(app)
                survivor = (b if doomed is a else a).node_id
                assert any(f"continues on node {survivor}" in n for n in notices(app, "warning"))
                assert f"{first} → {survivor}" in answers(app)[-1].status_text


async def test_the_only_node_dies_mid_answer(nats_url: str, tmp_path: Path) -> None:
    async with echo_node(nats_url, EchoEngine("echo-d", step_s=0.03)) as node:
        app = make_app(nats_url, tmp_path)
        async with app.run_test(size=(110, 40)) as pilot:
            await until(pilot, lambda: app.conv.model == "echo-d")
            await type_line(pilot, WORDS)
            await until(pilot, lambda: app.stream is not None and len(app.stream.text.split()) >= 3)
            await node.drain(timeout=0)
            await until(pilot, lambda: not app.generating, timeout=30)
            shown = answers(app)[-1].text
            assert shown and WORDS.startswith(shown) and len(shown.split()) < 150
            assert (
                f"node {node.node_id} died mid-answer and no other node could continue"
                in (notices(app, "error")[-1])
            )
            assert "what was shown is kept" in notices(app, "error")[-1]
            assert app.conv.messages[-1].content == shown


async def test_multiline_history_and_completion(nats_url: str, tmp_path: Path) -> None:
    async with echo_node(nats_url, EchoEngine("echo-m")):
        app = make_app(nats_url, tmp_path)
        async with app.run_test(size=(110, 40)) as pilot:
            await until(pilot, lambda: app.conv.model == "echo-m")
            prompt = app.query_one(PromptInput)
            prompt.focus()
            await pilot.press("a", "ctrl+j", "b", "enter")
            await until(pilot, lambda: not app.generating and len(answers(app)) == 1)
            assert users(app) == ["a\nb"]
            await ask(pilot, "second")
            await pilot.press("up")
            assert prompt.text == "second"
            await pilot.press("up")
            assert prompt.text == "a\nb"
            await pilot.press("down")
            assert prompt.text == "second"
            await pilot.press("down")
            assert prompt.text == ""

            await pilot.press(*"!!reg", "tab")
            assert prompt.text == "!!regen"
            prompt.clear()
            await pilot.press(*"!!mod", "tab")
            assert prompt.text == "!!model "
            await pilot.press(*"echo-", "tab")
            assert prompt.text == "!!model echo-m"
            prompt.clear()
            (tmp_path / "saved-chat.json").write_text("[]")
            await pilot.press(*"!!load", "space", *"sav", "tab")
            assert prompt.text == "!!load saved-chat.json"


async def test_settings_panel_edits_params_and_flags_fill_it(nats_url: str, tmp_path: Path) -> None:
    async with echo_node(nats_url, EchoEngine("echo-p")):
        app = make_app(nats_url, tmp_path, system="you are terse", temperature=0.2, top_p=0.9, max_tokens=7)
        async with app.run_test(size=(130, 40)) as pilot:
            await until(pilot, lambda: app.conv.model == "echo-p")
            await pilot.press("f2")
            assert "-shown" in app.query_one(Settings).classes
            assert app.query_one("#temperature", Input).value == "0.2"
            assert app.query_one("#max_tokens", Input).value == "7"
            assert app.query_one("#system").text == "you are terse"  # type: ignore[attr-defined]
            app.query_one("#top_p", Input).value = "0.5"
            app.query_one("#max_tokens", Input).value = "3"
            await until(pilot, lambda: app.conv.top_p == 0.5 and app.conv.max_tokens == 3)
            app.query_one("#temperature", Input).value = "9"
            await pilot.pause()
            assert "-invalid" in app.query_one("#temperature", Input).classes and app.conv.temperature == 0.2
            answer = await ask(pilot, "one two three four five six")
            assert answer.text == "one two three" and "stopped at max tokens" in answer.status_text
            assert app.conv.request_messages()[0].content == "you are terse"


async def test_no_node_then_bus_goes_away_and_comes_back(tmp_path: Path) -> None:
    server = EmbeddedServer(data_dir=tmp_path / "js", port=0, log_file=tmp_path / "nats.log")
    url = server.start()
    try:
        app = make_app(url, tmp_path, autostart=False)
        async with app.run_test(size=(110, 40)) as pilot:
            await until(pilot, lambda: any("no node is on the bus yet" in n for n in notices(app)))
            await type_line(pilot, "anyone?")
            await until(pilot, lambda: notices(app, "error"))
            assert "no model to ask" in notices(app, "error")[-1]
            server.stop()
            await until(pilot, lambda: any("lost the bus" in n for n in notices(app, "error")))
            assert "-down" in app.query_one("#status").classes
            assert server.start() == url  # the same port: the client reconnects by itself
            await until(pilot, lambda: any("bus is back" in n for n in notices(app)), timeout=20)
            async with echo_node(url, EchoEngine("echo-r")):
                await until(pilot, lambda: app.conv.model == "echo-r")
                app.query_one(PromptInput).clear()
                answer = await ask(pilot, "after the outage")
                assert answer.text == "after the outage", transcript(app)
    finally:
        server.stop()
