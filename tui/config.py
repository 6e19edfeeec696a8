"""The chat's settings, from `chatbus chat` / `python -m tui` flags (no UI imports here)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from bus import SamplingParams

__all__ = ["ChatConfig", "add_chat_options", "config_from_args"]


def add_chat_options(p: argparse.ArgumentParser) -> None:
    """The chat's own flags, one declaration for `chatbus chat` and `python -m tui`."""
    p.add_argument("--model", default=None, help="model name (default: the first one served)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument(
        "--repetition-penalty", type=float, default=1.0, help="above 1 discourages loops (1 = off)"
    )
    p.add_argument("--plain", action="store_true", help="no terminal app: read stdin, print the answer only")


@dataclass
class ChatConfig:
    url: str
    model: str | None = None
    system: str = ""
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int | None = 512
    repetition_penalty: float = 1.0
    state_dir: Path | None = None
    autostart: bool = True  # start `chatbus up` when nothing answers at a loopback URL
    cwd: Path = field(default_factory=Path.cwd)
    tick_s: float = 0.5  # how often the app checks the connection and the model list

    def problems(self) -> list[str]:
        """The flags' sampling values out of the bus contract's ranges (empty: fine)."""
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            max_tokens=self.max_tokens,
            repetition_penalty=self.repetition_penalty,
        ).problems()


def config_from_args(url: str, args: argparse.Namespace) -> ChatConfig:
    """Works with `chatbus chat`'s namespace and with `python -m tui`'s (a superset)."""
    return ChatConfig(
        url=url,
        model=getattr(args, "model", None),
        system=getattr(args, "system", None) or "",
        temperature=getattr(args, "temperature", 0.7),
        top_p=getattr(args, "top_p", 1.0),
        max_tokens=getattr(args, "max_tokens", 512),
        repetition_penalty=getattr(args, "repetition_penalty", 1.0),
        state_dir=getattr(args, "state_dir", None),
        autostart=not getattr(args, "no_start", False),
    )
