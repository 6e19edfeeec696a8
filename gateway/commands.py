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
    from gateway.__main__ import main

    argv = ["--nats", url, "--host", args.host, "--port", str(args.port), "--log-level", args.log_level]
    argv += ["--max-body-bytes", str(args.max_body_bytes), "--max-n", str(args.max_n)]
    argv += ["--deadline", str(args.deadline), "--keepalive-timeout", str(args.keepalive_timeout)]
    argv += ["--sse-ping", str(args.sse_ping)]
    if args.log_format:
        argv += ["--log-format", args.log_format]
    for key in args.api_key:
        argv += ["--api-key", key]
    for origin in args.cors_origin:
        argv += ["--cors-origin", origin]
    return main(argv)
