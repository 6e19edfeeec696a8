"""FastChat's in-chat `!!` commands: parsing and tab completion (pure functions, no UI)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["COMMANDS", "Command", "CommandError", "complete", "help_text", "parse"]

# name -> (argument, help). The argument is shown in !!help and drives completion.
COMMANDS: dict[str, tuple[str, str]] = {
    "!!exit": ("", "leave the chat"),
    "!!reset": ("", "start a new conversation (keeps model, system prompt and parameters)"),
    "!!remove": ("", "drop the last exchange (your message and its answer)"),
    "!!regen": ("", "answer your last message again"),
    "!!copy": ("", "copy the last answer to the clipboard (the terminal's OSC 52)"),
    "!!save": ("FILE", "save the conversation as JSON"),
    "!!load": ("FILE", "load a conversation saved with !!save"),
    "!!model": ("NAME", "switch to another model served on the bus"),
    "!!help": ("", "list these commands"),
}


@dataclass(frozen=True)
class Command:
    name: str
    arg: str = ""


class CommandError(ValueError):
    """A `!!` line that is not a valid command; the message says what would be."""


def parse(text: str) -> Command | None:
    """The command in `text`, None for an ordinary message; CommandError for a bad `!!` line."""
    stripped = text.strip()
    if not stripped.startswith("!!"):
        return None
    name, _, arg = stripped.partition(" ")
    name, arg = name.lower(), arg.strip()
    if name not in COMMANDS:
        raise CommandError(f"unknown command {name}; try one of: {', '.join(COMMANDS)}")
    wants = COMMANDS[name][0]
    if wants and not arg:
        raise CommandError(f"{name} needs a {wants}: {name} {wants}")
    if not wants and arg:
        raise CommandError(f"{name} takes no argument")
    return Command(name, arg)


def help_text() -> str:
    rows = [f"{name} {arg}".strip().ljust(14) + f" {text}" for name, (arg, text) in COMMANDS.items()]
    return "\n".join(rows)


def _common_prefix(options: list[str]) -> str:
    if not options:
        return ""
    first, last = min(options), max(options)
    n = 0
    while n < min(len(first), len(last)) and first[n] == last[n]:
        n += 1
    return first[:n]


def _complete_path(partial: str, cwd: Path) -> list[str]:
    expanded = os.path.expanduser(partial)
    folder, stem = os.path.split(expanded)
    base = (cwd / folder) if folder else cwd
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return []
    shown = partial[: len(partial) - len(stem)] if stem else partial
    out = []
    for name in names:
        if name.startswith(stem) and (stem.startswith(".") or not name.startswith(".")):
            suffix = "/" if (base / name).is_dir() else ""
            out.append(shown + name + suffix)
    return out


def complete(text: str, models: Iterable[str], cwd: Path) -> tuple[str, list[str]]:
    """Complete `text` as far as it is unambiguous; also return the candidates (for display).

    Command names complete from `!`; `!!model ` completes served model names; `!!save `/`!!load `
    complete file paths relative to `cwd`.
    """
    if not text.startswith("!") or "\n" in text:
        return text, []
    name, space, arg = text.partition(" ")
    if not space:
        options = [c for c in COMMANDS if c.startswith(name.lower())]
        if len(options) == 1:
            return options[0] + (" " if COMMANDS[options[0]][0] else ""), options
        return max(text, _common_prefix(options), key=len), options
    if name == "!!model":
        options = sorted(m for m in models if m.startswith(arg))
    elif name in ("!!save", "!!load"):
        options = _complete_path(arg, cwd)
    else:
        return text, []
    if not options:
        return text, []
    return f"{name} {max(arg, _common_prefix(options), key=len)}", options
