"""`chatbus chat`: one-shot with a prompt (or stdin), else the terminal app (`python -m tui`'s)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from typing import Any

from tui.config import add_chat_options, config_from_args

__all__ = ["add_commands"]


def add_commands(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    chat = sub.add_parser("chat", help="chat with a model (one-shot with a prompt, else the terminal app)")
    common(chat)
    chat.add_argument("prompt", nargs="?", help="ask this and print the answer (stdin if '-')")
    add_chat_options(chat)
    chat.set_defaults(func=cmd_chat)


def cmd_chat(args: argparse.Namespace, url: str) -> int:
    """The terminal app on a terminal with no prompt; else the prompt (or stdin) in, the streamed answer
    out, with the same code as the app's plain mode."""
    if args.prompt is None and not args.plain and sys.stdin.isatty() and sys.stdout.isatty():
        try:
            from tui.app import run_tui
        except ImportError:
            print('the terminal app is not installed; pass a prompt: chatbus chat "..."', file=sys.stderr)
            return 2
        return run_tui(url, args)
    from tui.plain import run_plain

    prompt = sys.stdin.read() if args.prompt in (None, "-") else args.prompt
    return asyncio.run(run_plain(config_from_args(url, args), prompt))
