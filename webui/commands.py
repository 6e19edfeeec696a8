"""`chatbus export-logs`: the web app's chat & vote log as FastChat-shaped JSONL."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["add_commands"]


def add_commands(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser(
        "export-logs",
        help="write the web app's chats and votes as JSONL in FastChat's conversation-log shape",
    )
    common(p)
    p.add_argument("-o", "--out", default="-", help="output file (default: stdout)")
    p.add_argument("--only", choices=["chat", "vote"], default=None, help="only answers or only votes")
    p.set_defaults(func=_export)


def _export(args: argparse.Namespace, url: str) -> int:
    from webui.export import write_jsonl

    records = asyncio.run(fetch(url, args.only))
    if args.out == "-":
        n = write_jsonl(records, sys.stdout)
    else:
        with Path(args.out).open("w", encoding="utf-8") as f:
            n = write_jsonl(records, f)
    print(f"exported {n} records", file=sys.stderr)
    return 0


async def fetch(url: str, only: str | None = None) -> list[Any]:
    """Every record in the log (or only answers / only votes), oldest first."""
    from bus import connect, read_logs, subjects

    subject = {"chat": subjects.log_chat(), "vote": subjects.log_vote()}.get(only or "")
    nc = await connect(url, name="chatbus-export-logs")
    try:
        return [r async for r in read_logs(nc.jetstream(), subject)]
    finally:
        await nc.close()
