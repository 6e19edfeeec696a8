"""`python -m gateway --nats URL --host H --port P [--api-key K]... [--cors-origin O]...`.

The only place the gateway reads its environment ($CHATBUS_NATS, $CHATBUS_API_KEYS).
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Sequence

from bus.errors import BusUnavailable
from bus.logfmt import setup_logging
from gateway.main import config_from, parser, serve


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    log_format = args.log_format or os.environ.get("CHATBUS_LOG_FORMAT") or "text"
    setup_logging(args.log_level, log_format)
    nats_url = args.nats or os.environ.get("CHATBUS_NATS") or "nats://127.0.0.1:4222"
    try:
        asyncio.run(
            serve(
                nats_url,
                args.host,
                args.port,
                config_from(args, dict(os.environ)),
                args.log_level,
                log_format,
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
