"""`chatbus gateway`: run the OpenAI-compatible gateway in the foreground (same options as `python -m gateway`)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

__all__ = ["add_commands"]


def add_commands(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    from gateway.main import add_options

    p = sub.add_parser("gateway", help="serve the OpenAI-compatible API (http://HOST:PORT/v1) for the bus")
    common(p)
    add_options(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace, url: str) -> int:
    import os

    from gateway.__main__ import run

    return run(args, url, os.environ)
