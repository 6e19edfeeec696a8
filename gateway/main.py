"""Run the gateway: connect to the bus, build the app, serve it with uvicorn until a signal."""

from __future__ import annotations

import argparse
import contextlib
import logging

import uvicorn

from bus import BusClient, add_nats_option, redact
from gateway.app import build_app
from gateway.config import GatewayConfig

__all__ = ["add_options", "config_from", "parser", "serve"]

log = logging.getLogger("gateway")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gateway", description="OpenAI-compatible API over the chatbus bus."
    )
    add_nats_option(p)
    add_options(p)
    return p


def add_options(p: argparse.ArgumentParser) -> None:
    """Every gateway option but --nats (shared with `chatbus gateway`)."""
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        action="append",
        default=[],
        help="accept this Bearer key (repeatable; also $CHATBUS_API_KEYS, comma-separated); none: no auth",
    )
    p.add_argument(
        "--cors-origin", action="append", default=[], help="allow browser calls from this origin ('*': any)"
    )
    p.add_argument("--max-body-bytes", type=int, default=GatewayConfig.max_body_bytes)
    p.add_argument("--max-n", type=int, default=GatewayConfig.max_n, help="most choices per request")
    p.add_argument("--deadline", type=float, default=GatewayConfig.deadline_s, help="seconds per generation")
    p.add_argument(
        "--keepalive-timeout",
        type=float,
        default=GatewayConfig.keepalive_s,
        help="seconds a node goes on generating for this gateway after its keep-alives stop (it died)",
    )
    p.add_argument(
        "--sse-ping",
        type=float,
        default=GatewayConfig.sse_ping_s,
        help="seconds between keep-alive comments on a quiet SSE stream (proxies close idle ones)",
    )
    p.add_argument("--log-level", default="info")
    p.add_argument(
        "--log-format",
        choices=["text", "json"],
        default=None,
        help="json: one object a line ($CHATBUS_LOG_FORMAT)",
    )


def config_from(args: argparse.Namespace, environ: dict[str, str]) -> GatewayConfig:
    keys = list(args.api_key) + [
        k.strip() for k in environ.get("CHATBUS_API_KEYS", "").split(",") if k.strip()
    ]
    return GatewayConfig(
        api_keys=tuple(dict.fromkeys(keys)),
        cors_origins=tuple(args.cors_origin),
        max_body_bytes=args.max_body_bytes,
        max_n=args.max_n,
        deadline_s=args.deadline,
        keepalive_s=args.keepalive_timeout,
        sse_ping_s=args.sse_ping,
    )


async def serve(
    nats_url: str,
    host: str,
    port: int,
    config: GatewayConfig,
    log_level: str = "info",
    log_format: str = "text",
) -> None:
    """Own a BusClient and a uvicorn server for as long as the server runs."""
    async with contextlib.AsyncExitStack() as stack:
        client = await BusClient.connect(
            nats_url, name=f"chatbus-gateway {host}:{port}", keepalive_s=config.keepalive_s
        )
        stack.push_async_callback(client.close)
        app = build_app(client, config)
        await app.state.ops.ready()  # metrics, keys and limits watched from the start
        stack.push_async_callback(app.state.ops.stop)
        # JSON logs: uvicorn's loggers (access lines too) go through the root handler of bus.logfmt
        log_config = None if log_format == "json" else uvicorn.config.LOGGING_CONFIG
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                host=host,
                port=port,
                log_level=log_level,
                lifespan="off",
                timeout_graceful_shutdown=5,
                log_config=log_config,
            )
        )
        auth = f"{len(config.api_keys)} API key(s)" if config.api_keys else "no API key (open)"
        log.info("gateway on http://%s:%d/v1, bus %s, %s", host, port, redact(nats_url), auth)
        await server.serve()
