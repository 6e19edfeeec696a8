"""Start the embedded defaults (`chatbus up` without web UI or gateway) when nothing answers at the URL.

So `chatbus chat` alone works on a fresh machine: the chat spawns `python -m chatbus up --no-web
--no-gateway` as a child in its own process group, learns the URL it bound from its first line, and
stops it (which drains and stops its node and server) when the chat ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

from bus import default_state_dir, read_nats_url, stop_process_group

__all__ = ["EmbeddedDefaults", "is_local", "port_of", "reachable"]

_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0", ""}
_STARTING = "node(s) on nats://"


def is_local(url: str) -> bool:
    """Only a loopback URL may be started by us; a remote one that is down is the user's to fix."""
    return (urlparse(url).hostname or "") in _LOCAL_HOSTS


def port_of(url: str) -> int:
    return urlparse(url).port or 4222


def reachable(url: str, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections at the URL (cheaper than a NATS connect)."""
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 4222), timeout):
            return True
    except OSError:
        return False


class EmbeddedDefaults:
    """One `chatbus up --no-web --no-gateway` child that we started and will stop."""

    def __init__(self, port: int, state_dir: Path | None = None) -> None:
        self.port = port
        # Where the child records its URL (with our credential): we read it back from there.
        self.state_dir = state_dir or default_state_dir()
        self.log_path = self.state_dir / "logs" / "tui-up.log"
        self.process: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "chatbus", "up", "--no-web", "--no-gateway"]
        return [*argv, "--nats-port", str(self.port), "--state-dir", str(self.state_dir)]

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.write_bytes(b"")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.argv(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # the terminal's Ctrl-C is ours, not its
            )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def tail(self, lines: int = 6) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    async def wait_url(self, timeout: float = 30.0) -> str:
        """The URL the child's server bound (it may have moved off a taken port), with the ui
        credential it made: it writes that to its state dir before it says it is starting nodes."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError):
                if _STARTING in self.log_path.read_text(errors="replace"):
                    url = read_nats_url(self.state_dir)
                    if url:
                        return url
            if not self.alive():
                raise RuntimeError(f"`chatbus up` exited while starting:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"`chatbus up` did not start a server in {timeout:.0f}s; see {self.log_path}"
                )
            await asyncio.sleep(0.1)

    def terminate(self) -> None:
        """Ask it to stop (SIGTERM) without waiting; `stop()` then waits."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM: `chatbus up` stops its node (which drains) and its server, then exits."""
        proc, self.process = self.process, None
        if proc is not None:
            stop_process_group(proc, timeout)
