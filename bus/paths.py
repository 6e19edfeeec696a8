"""Where chatbus keeps its state (the embedded server's data, the URL it runs at) and its model cache."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path

__all__ = [
    "DEFAULT_NATS",
    "add_nats_option",
    "default_cache_dir",
    "default_state_dir",
    "private_dir",
    "read_nats_url",
    "resolve_nats",
    "write_nats_url",
    "write_private",
]

DEFAULT_NATS = "nats://127.0.0.1:4222"


def add_nats_option(parser: argparse.ArgumentParser, help: str = "") -> None:
    """The one `--nats` flag every command declares; `resolve_nats` turns it into the URL."""
    parser.add_argument(
        "--nats", default=None, help=help or f"NATS URL (default: $CHATBUS_NATS, else {DEFAULT_NATS})"
    )


def resolve_nats(flag: str | None, environ: Mapping[str, str], state_dir: Path | None = None) -> str:
    """The bus a command joins: `--nats`, else $CHATBUS_NATS, else (given `state_dir`) the one a running
    `chatbus up` recorded there, else the default port. Each `__main__` passes its environment."""
    recorded = read_nats_url(state_dir) if state_dir is not None else None
    return flag or environ.get("CHATBUS_NATS") or recorded or DEFAULT_NATS


def default_state_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "chatbus"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "chatbus"


def private_dir(path: Path) -> Path:
    """`path`, created if need be, readable by its owner only (it holds secrets, chats, logs)."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def write_private(path: Path, text: str) -> None:
    """Write a secret: the file never exists with wider permissions than 0600, not even briefly."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    tmp.replace(path)


def write_nats_url(state_dir: Path, url: str) -> None:
    """Record the URL (it may carry a credential: the file is private to the user)."""
    write_private(private_dir(state_dir) / "nats.url", url + "\n")


def clear_nats_url(state_dir: Path) -> None:
    (state_dir / "nats.url").unlink(missing_ok=True)


def read_nats_url(state_dir: Path) -> str | None:
    """The URL a running `chatbus up` recorded, if any."""
    try:
        return (state_dir / "nats.url").read_text().strip() or None
    except OSError:
        return None
