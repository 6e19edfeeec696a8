"""`python -m tui`: the terminal chat on any NATS URL (the same app `chatbus chat` opens)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from bus import add_nats_option, resolve_nats
from tui.config import add_chat_options


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tui", description="Chat with models on the chatbus bus.")
    add_nats_option(p)
    p.add_argument("--state-dir", type=Path, default=None, help="state dir for the embedded defaults")
    add_chat_options(p)
    p.add_argument(
        "--no-start", action="store_true", help="never start the embedded defaults when nothing answers"
    )
    args = p.parse_args(argv)
    args.nats = resolve_nats(args.nats, os.environ)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        if args.plain or not sys.stdout.isatty():  # no need to load Textual for a pipe
            import asyncio

            from tui.config import config_from_args
            from tui.plain import run_plain

            return asyncio.run(run_plain(config_from_args(args.nats, args), sys.stdin.read()))
        from tui.app import run_tui

        return run_tui(args.nats, args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
