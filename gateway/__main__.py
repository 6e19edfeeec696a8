"""`python -m gateway --nats URL --host H --port P [--api-key K]... [--cors-origin O]...`.

The only place the gateway reads its environment ($CHATBUS_NATS, $CHATBUS_API_KEYS).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Mapping, Sequence

from bus import BusUnavailable, resolve_nats, setup_logging
from gateway.main import config_from, parser, serve


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run(args, resolve_nats(args.nats, os.environ), os.environ)


def run(args: argparse.Namespace, nats_url: str, environ: Mapping[str, str]) -> int:
    """Serve with parsed gateway options (`python -m gateway` and `chatbus gateway` alike)."""
    log_format = args.log_format or environ.get("CHATBUS_LOG_FORMAT") or "text"
    setup_logging(args.log_level, log_format)
    try:
        asyncio.run(
            serve(
                nats_url, args.host, args.port, config_from(args, dict(environ)), args.log_level, log_format
            )
        )
    except BusUnavailable as e:
        print(f"gateway: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
