"""The terminal chat with the REAL default model: pilot, plain mode, and the real binary in a terminal."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import MODEL_CACHE, ROOT
from procs import node_process, wait_until
from test_tui_support import answers, ask, make_app, type_line, until

from bus import BusClient
from bus.server import free_port
from tui.launcher import reachable

pytestmark = pytest.mark.model

QUESTION = "What is the capital of France?"
CHATBUS = str(Path(sys.executable).parent / "chatbus")


@pytest.fixture(scope="module")
def real_node(nats_url: str, tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[str]:
    """A `python -m node` with SmolLM2-135M-Instruct; yields the model name once it heartbeats."""
    log = tmp_path_factory.mktemp("node") / "node.log"
    with node_process(nats_url, log) as proc:
        found: list[str] = []

        async def models() -> list[str]:
            client = await BusClient.connect(nats_url, name="tui-test-probe")
            try:
                return list(client.models())
            finally:
                await client.close()

        def ready() -> bool:
            found[:] = asyncio.run(models())
            return bool(found)

        wait_until(ready, timeout=240, proc=proc, log=log)
        yield found[0]


def test_plain_mode_prints_only_the_answer(nats_url: str, real_node: str) -> None:
    # No --plain: stdout is a pipe here, which must be enough.
    argv = [sys.executable, "-m", "tui", "--nats", nats_url, "--temperature", "0", "--max-tokens", "24"]
    done = subprocess.run(argv, input=QUESTION, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout and done.stdout.count("\n") <= 3 and not done.stderr


async def test_pilot_streams_a_real_answer_and_stops_one(
    nats_url: str, real_node: str, client: BusClient, tmp_path: Path
) -> None:
    app = make_app(nats_url, tmp_path, temperature=0.0, max_tokens=24)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: app.conv.model == real_node)
        answer = await ask(pilot, QUESTION, timeout=120)
        assert "Paris" in answer.text and "Paris" in answer.markdown.source
        assert "completion tokens" in answer.status_text and "tok/s" in answer.status_text
        assert answer.status_text.startswith(f"✓ {real_node} · node ")

        app.conv.max_tokens = 400
        await type_line(pilot, "Write a very long story about a dragon who learns to bake bread.")
        await until(pilot, lambda: app.stream is not None and len(app.stream.text.split()) >= 3, 120)
        await pilot.press("escape")
        await until(pilot, lambda: not app.generating, 60)
        stopped = answers(app)[-1]
        assert "stopped" in stopped.status_text and stopped.text
        assert app.conv.messages[-1].content == stopped.text
        # The node stopped decoding: its heartbeat shows nothing running.
        await until(pilot, lambda: all(n.running == 0 for n in client.nodes()), 30, "the node to go idle")


# ----------------------------------------------------------------------------- the real binary in tmux


class Terminal:
    """One tmux server of our own (its own socket) running one command; read the screen as text."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path) -> None:
        self.socket = f"chatbus-test-{uuid.uuid4().hex[:8]}"
        command = " ".join(_quote(a) for a in argv)
        env_args = [a for k, v in env.items() for a in ("-e", f"{k}={v}")]
        self._tmux("new-session", "-d", "-x", "120", "-y", "40", "-c", str(cwd), *env_args, command)
        self._tmux("set-option", "-t", "0", "remain-on-exit", "on")

    def _tmux(self, *args: str) -> str:
        done = subprocess.run(
            ["tmux", "-L", self.socket, *args], capture_output=True, text=True, timeout=20, check=False
        )
        return done.stdout

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", "0")

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "0", *keys)

    def type(self, text: str) -> None:
        self._tmux("send-keys", "-t", "0", "-l", text)

    def exited(self) -> bool:
        return self._tmux("display-message", "-p", "-t", "0", "#{pane_dead}").strip() == "1"

    def wait_for(self, predicate: Callable[[str], bool], timeout: float, what: str) -> str:
        """Wait until `predicate(screen)`; the screen's words are joined by single spaces
        (so text the app wrapped over two lines still matches)."""
        deadline = time.monotonic() + timeout
        while True:
            screen = " ".join(self.screen().split())
            if predicate(screen):
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; the screen:\n{self.screen()}")
            time.sleep(0.2)

    def close(self) -> None:
        self._tmux("kill-server")


def _quote(arg: str) -> str:
    return "'" + arg.replace("'", "'\\''") + "'"


@contextlib.contextmanager
def terminal(argv: list[str], env: dict[str, str], cwd: Path) -> Iterator[Terminal]:
    if shutil.which("tmux") is None:
        pytest.fail("tmux is missing: ./dev test installs it (apt-get install tmux)")
    term = Terminal(argv, {"TERM": "xterm-256color", **env}, cwd)
    try:
        yield term
    finally:
        term.close()


def _chat_in_terminal(term: Terminal, model: str, timeout: float) -> None:
    term.wait_for(lambda s: f"{model} on 1 node" in s, timeout, "the model in the status line")
    term.type(QUESTION)
    term.keys("Enter")
    screen = term.wait_for(lambda s: "completion tokens" in s, 120, "the answer's stats")
    assert "Paris" in screen and "tok/s" in screen
    term.type("!!exit")
    term.keys("Enter")
    wait_until(term.exited, timeout=90)


def test_chatbus_chat_in_a_terminal(nats_url: str, real_node: str, tmp_path: Path) -> None:
    argv = [CHATBUS, "chat", "--nats", nats_url, "--temperature", "0", "--max-tokens", "24"]
    with terminal(argv, {}, tmp_path) as term:
        _chat_in_terminal(term, real_node, 60)


def test_chatbus_chat_alone_starts_the_embedded_defaults(tmp_path: Path, model_cache: Path) -> None:
    """Nothing answers at the URL: the chat starts `chatbus up --no-web --no-gateway` and stops it."""
    cache = tmp_path / "cache" / "chatbus"
    cache.mkdir(parents=True)
    (cache / "models").symlink_to(MODEL_CACHE)  # `chatbus up`'s default cache dir, already converted
    url = f"nats://127.0.0.1:{free_port()}"
    state = tmp_path / "state"
    argv = [CHATBUS, "chat", "--nats", url, "--state-dir", str(state), "--temperature", "0"]
    argv += ["--max-tokens", "24"]
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "PATH": os.environ.get("PATH", "")}
    with terminal(argv, env, tmp_path) as term:
        term.wait_for(lambda s: "starting the embedded bus" in s, 30, "the start notice")
        _chat_in_terminal(term, "SmolLM2-135M-Instruct", 240)
    assert not reachable(url), "the embedded server outlived the chat"
    log = (state / "logs" / "tui-up.log").read_text()
    assert "stopping" in log, log
