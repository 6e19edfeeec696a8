"""The `chatbus` command: up, models, node, setup-bus (and the commands packages add: chat, train, eval, ...)."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import sys
from pathlib import Path

from nats.errors import TimeoutError as NatsTimeout

from bus import (
    BusClient,
    BusError,
    add_nats_option,
    connect,
    default_cache_dir,
    default_state_dir,
    local_url,
    prepare_bus,
    redact,
    resolve_nats,
)

__all__ = ["main"]

PLUGIN_PACKAGES = ("chatbus", "gateway", "tui", "webui", "trainer", "judge")


def _common(p: argparse.ArgumentParser) -> None:
    add_nats_option(p, "NATS URL (default: $CHATBUS_NATS, else the one `chatbus up` started)")
    p.add_argument(
        "--state-dir", type=Path, default=default_state_dir(), help="chatbus state (server data, URL)"
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="chatbus", description="Serve, chat with, evaluate and fine-tune LLMs over NATS."
    )
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start a whole system: nats-server, a node per model, gateway, web UI")
    _common(up)
    up.add_argument(
        "--model", action="append", default=None, help="model dir or hub id (repeatable; default model)"
    )
    up.add_argument("--cache-dir", type=Path, default=default_cache_dir() / "models")
    up.add_argument(
        "--nats-port", type=int, default=4222, help="port of the embedded server (next free if taken)"
    )
    up.add_argument(
        "--nats-host",
        default="127.0.0.1",
        help="address of the embedded server (0.0.0.0: nodes on other machines join with `chatbus node-token`)",
    )
    up.add_argument("--gateway-host", default="127.0.0.1")
    up.add_argument("--gateway-port", type=int, default=8000)
    up.add_argument("--no-gateway", action="store_true")
    up.add_argument("--web-host", default="127.0.0.1")
    up.add_argument("--web-port", type=int, default=8080)
    up.add_argument("--no-web", action="store_true")
    up.add_argument(
        "--api-key", action="append", default=[], help="require this key on the gateway (repeatable)"
    )
    up.add_argument(
        "--no-auth",
        action="store_true",
        help="embedded server without credentials (default: one per role, see docs/security.md)",
    )
    up.add_argument(
        "--log-format", choices=["text", "json"], default=None, help="json: every process logs JSON lines"
    )
    up.add_argument("--trainer", action="store_true", help="also run a training worker")
    up.add_argument("--judge", action="store_true", help="also run an evaluation worker")
    up.add_argument(
        "--node-arg",
        action="append",
        default=[],
        help="extra argument for every node, e.g. --node-arg=--load-8bit",
    )

    models = sub.add_parser("models", help="list live nodes and the models they serve")
    _common(models)

    setup = sub.add_parser(
        "setup-bus",
        help="create every chatbus stream and bucket on a server of yours (once, with the admin credential)",
    )
    _common(setup)

    node = sub.add_parser("node", help="run a node (same options as `python -m node`)", add_help=False)
    node.add_argument("args", nargs=argparse.REMAINDER)

    # Packages add their own commands (`chatbus train ...`, `chatbus eval ...`, `chatbus export-logs`):
    # a `<package>/commands.py` with `add_commands(subparsers, common)` that sets `func(args, url) -> int`
    # on each parser it adds. A package that is not installed adds nothing.
    from chatbus.tokens import add_commands

    add_commands(sub, _common)  # `chatbus node-token ...`, `chatbus worker-token ...`
    for package in PLUGIN_PACKAGES:
        try:
            module = importlib.import_module(f"{package}.commands")
        except ImportError:
            continue
        module.add_commands(sub, _common)
    return p


async def _client(url: str) -> BusClient:
    client = await BusClient.connect(url, name="chatbus-cli")
    if not client.nodes():  # a node may be between heartbeats right after start
        await asyncio.sleep(0.5)
    return client


async def cmd_models(url: str) -> int:
    client = await _client(url)
    try:
        nodes = client.nodes()
        if not nodes:
            print(f"no nodes on {redact(url)}. start one with `chatbus up` or `python -m node --nats URL`")
            return 1
        print(
            f"{'MODEL':<28} {'BASE':<24} {'NODE':<36} {'DEVICE':<8} {'DTYPE':<9} {'CTX':>6} {'LOAD':>9} {'TOK/S':>7}"
        )
        for name, entry in sorted(client.models().items()):
            for n in entry.nodes:
                load = f"{n.running + n.queued}/{n.capacity}"
                base = next((c.base for c in n.models if c.name == name), "") or "-"  # an adapter's base
                print(
                    f"{name:<28} {base:<24} {n.node_id:<36} {n.device:<8} {n.dtype:<9} {entry.context_length:>6} "
                    f"{load:>9} {n.tokens_per_s:>7.1f}"
                )
        return 0
    finally:
        await client.close()


async def cmd_setup_bus(url: str) -> int:
    """What `chatbus up` does on its own server before anything else starts (docs/security.md)."""
    nc = await connect(url, name="chatbus-setup-bus")
    try:
        await prepare_bus(nc)
    except NatsTimeout:  # the server refuses a forbidden request and we hear nothing back
        print(
            f"{redact(url)} did not let us create chatbus's streams: use the admin credential",
            file=sys.stderr,
        )
        return 1
    finally:
        await nc.close()
    print(f"streams and buckets ready on {redact(url)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["node"]:  # everything after `node` belongs to the node's own parser
        own = any(a.startswith("--creds") for a in argv) or os.environ.get("CHATBUS_CREDS")
        environ = dict(os.environ)
        if "--nats" not in argv and not os.environ.get("CHATBUS_NATS") and not own:
            # On the machine of a running `chatbus up`: join its bus with the node credential.
            url = local_url(default_state_dir(), "node")
            if url:
                environ["CHATBUS_NATS"] = url  # the node's own parser defaults to it
        from node.__main__ import parse
        from node.main import main as node_main

        return node_main(parse(argv[1:], environ))
    args = _parser().parse_args(argv)
    try:
        if args.command == "up":
            if args.log_format:  # every child reads it (bus.logfmt)
                os.environ["CHATBUS_LOG_FORMAT"] = args.log_format
            from chatbus.up import UpConfig, run_up

            cfg = UpConfig(
                models=args.model or ["default"],
                nats=args.nats,
                state_dir=args.state_dir,
                cache_dir=args.cache_dir,
                nats_port=args.nats_port,
                nats_host=args.nats_host,
                gateway=not args.no_gateway,
                gateway_host=args.gateway_host,
                gateway_port=args.gateway_port,
                web=not args.no_web,
                web_host=args.web_host,
                web_port=args.web_port,
                api_keys=args.api_key or [k for k in os.environ.get("CHATBUS_API_KEYS", "").split(",") if k],
                node_args=args.node_arg,
                trainer=args.trainer,
                judge=args.judge,
                auth=not args.no_auth,
            )
            return asyncio.run(run_up(cfg))
        url = resolve_nats(args.nats, os.environ, args.state_dir)
        if hasattr(args, "func"):
            return int(args.func(args, url))
        if args.command == "models":
            return asyncio.run(cmd_models(url))
        if args.command == "setup-bus":
            return asyncio.run(cmd_setup_bus(url))
    except BusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 2
