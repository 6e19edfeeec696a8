"""Start and stop the project's own processes in tests; nothing is left behind."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from conftest import MODEL_CACHE

ROOT = Path(__file__).resolve().parent.parent


def spawn(argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )


def stop(proc: subprocess.Popen[bytes], timeout: float = 30.0, sig: int = signal.SIGTERM) -> int:
    """Signal the process group, wait, then kill whatever is left of it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait()


def node_argv(nats_url: str, *, name: str | None = None, extra: list[str] | None = None) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "node",
        "--model",
        "default",
        "--nats",
        nats_url,
        "--cache-dir",
        str(MODEL_CACHE),
    ]
    if name:
        argv += ["--name", name]
    return argv + (extra or [])


@contextlib.contextmanager
def node_process(
    nats_url: str, log: Path, *, name: str | None = None, extra: list[str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """A real node serving the default model (optionally under another name)."""
    proc = spawn(node_argv(nats_url, name=name, extra=extra), log)
    try:
        yield proc
    finally:
        stop(proc)


def wait_until(
    predicate: Callable[[], object],
    timeout: float = 120.0,
    proc: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
    what: str = "",
) -> None:
    """Poll `predicate` until it holds: the one polling helper of the tests (`eventually` from a coroutine).

    Fails after `timeout` seconds, or at once when `proc` exits; the failure shows `log`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        _check(deadline, timeout, proc, log, what)
        time.sleep(0.1)


async def eventually(
    predicate: Callable[[], object],
    timeout: float = 10.0,
    proc: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
    what: str = "",
) -> None:
    """`wait_until` for a coroutine: `predicate` may return an awaitable; polls without blocking the loop."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        _check(deadline, timeout, proc, log, what)
        await asyncio.sleep(0.05)


def _check(
    deadline: float, timeout: float, proc: subprocess.Popen[bytes] | None, log: Path | None, what: str
) -> None:
    shown = f":\n{log.read_text(errors='replace')}" if log else ""
    if proc is not None and proc.poll() is not None:
        raise AssertionError(
            f"process exited with {proc.returncode} while waiting for {what or 'a condition'}{shown}"
        )
    if time.monotonic() > deadline:
        raise AssertionError(f"timed out after {timeout}s waiting for {what or 'a condition'}{shown}")
