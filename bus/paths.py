"""Where chatbus keeps its state (the embedded server's data, the URL it runs at) and its model cache."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["default_cache_dir", "default_state_dir", "read_nats_url", "write_nats_url"]

DEFAULT_NATS = "nats://127.0.0.1:4222"


def default_state_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "chatbus"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "chatbus"


def write_nats_url(state_dir: Path, url: str) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "nats.url").write_text(url + "\n")


def clear_nats_url(state_dir: Path) -> None:
    (state_dir / "nats.url").unlink(missing_ok=True)


def read_nats_url(state_dir: Path) -> str | None:
    """The URL a running `chatbus up` recorded, if any."""
    try:
        return (state_dir / "nats.url").read_text().strip() or None
    except OSError:
        return None
