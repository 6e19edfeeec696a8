"""The README's quick start, as a user runs it: `./dev up`, then `chatbus models` and `chatbus chat`."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from conftest import MODEL_CACHE
from procs import ROOT, stop, wait_until

from bus.server import free_port


def _wait_for_line(log: Path, needle: str, proc: subprocess.Popen[bytes], timeout: float = 300) -> None:
    wait_until(lambda: needle in log.read_text(errors="replace"), timeout, proc, log, what=repr(needle))


def _get(url: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10) as reply:
                return str(reply.read().decode())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _leftovers(marker: str) -> list[str]:
    out = subprocess.run(["pgrep", "-af", marker], capture_output=True, text=True)
    return [line for line in out.stdout.splitlines() if "pgrep" not in line]


def _second_node_joins(chatbus: str, state: Path, env: dict[str, str], tmp_path: Path) -> None:
    """The README's `chatbus node`: joins the running bus with the node credential, unprompted."""
    argv = [chatbus, "node", "--cache-dir", str(MODEL_CACHE), "--name", "second-node"]
    env = {k: v for k, v in env.items() if k != "CHATBUS_NATS"}
    with open(tmp_path / "node2.log", "wb") as out:
        node = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            models = subprocess.run(
                [chatbus, "models", "--state-dir", str(state)], capture_output=True, text=True, timeout=60
            )
            if "second-node" in models.stdout:
                break
            assert node.poll() is None, (tmp_path / "node2.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "node2.log").read_text()
            time.sleep(1)
    finally:
        stop(node)


def _secrets_stay_private(state: Path, log: Path) -> None:
    """`up` made a credential per role; none is printed, logged or visible on a command line."""
    passwords = json.loads((state / "auth" / "passwords.json").read_text()).values()
    assert stat.S_IMODE((state / "nats.url").stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    texts = [log.read_text(errors="replace")]
    texts += [f.read_text(errors="replace") for f in (state / "logs").iterdir()]
    texts += [f.read_text(errors="replace") for f in Path("/proc").glob("[0-9]*/cmdline") if _readable(f)]
    assert not [p for p in passwords for t in texts if p in t]


def _readable(f: Path) -> bool:
    try:
        f.read_bytes()
    except OSError:
        return False
    return True


def test_up_then_models_then_chat_then_ctrl_c(tmp_path: Path) -> None:
    state = tmp_path / "chatbus"  # the default state dir under $XDG_DATA_HOME, as `chatbus node` finds it
    log = tmp_path / "up.log"
    gateway_port, web_port = free_port(), free_port()
    argv = [
        str(ROOT / "dev"),
        "up",
        "--state-dir",
        str(state),
        "--cache-dir",
        str(MODEL_CACHE),
        "--nats-port",
        "0",
        "--gateway-port",
        str(gateway_port),
        "--web-port",
        str(web_port),
    ]
    env = {
        **os.environ,
        "CHATBUS_VENV": str(Path(sys.executable).parent.parent),
        "XDG_DATA_HOME": str(tmp_path),
    }
    with open(log, "wb") as out:
        up = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True
        )
    try:
        _wait_for_line(log, "ready.", up)
        text = log.read_text()
        assert "SmolLM2-135M-Instruct" in text and ":***@127.0.0.1:" in text
        _secrets_stay_private(state, log)
        chatbus = str(Path(sys.executable).parent / "chatbus")
        models = subprocess.run(
            [chatbus, "models", "--state-dir", str(state)], capture_output=True, text=True, timeout=60
        )
        assert models.returncode == 0 and "SmolLM2-135M-Instruct" in models.stdout, models.stderr
        chat = subprocess.run(
            [
                chatbus,
                "chat",
                "--state-dir",
                str(state),
                "--temperature",
                "0",
                "What is the capital of France?",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert chat.returncode == 0, chat.stderr
        assert "Paris" in chat.stdout
        _second_node_joins(chatbus, state, env, tmp_path)
        # the gateway and the web UI that `up` started answer too
        assert f"http://127.0.0.1:{gateway_port}/v1" in text and f"http://127.0.0.1:{web_port}" in text
        health = json.loads(_get(f"http://127.0.0.1:{gateway_port}/health"))
        assert health["nodes"] >= 1, health
        assert "chatbus" in _get(f"http://127.0.0.1:{web_port}/").lower()
        os.killpg(up.pid, signal.SIGINT)  # Ctrl-C in the terminal
        assert up.wait(90) == 0, log.read_text()
        assert "stopping" in log.read_text()
        assert not _leftovers(str(state)), _leftovers(str(state))  # every child is gone
        assert not (state / "nats.url").exists()
    finally:
        stop(up)
