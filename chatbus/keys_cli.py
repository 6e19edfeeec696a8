"""`chatbus keys create|list|revoke|usage`: managed API keys and what they used, from the bus."""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Callable
from typing import Any

from bus import (
    KeyRecord,
    KeyUsage,
    connect,
    create_key,
    ensure_keys_bucket,
    ensure_usage_bucket,
    list_keys,
    list_usage,
    local_url,
    parse_duration,
    redact,
    revoke_key,
)

__all__ = ["add_parser", "run_keys"]


def add_parser(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    keys = sub.add_parser("keys", help="API keys with limits and usage, valid on every gateway (admin)")
    actions = keys.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="make a key; its secret is printed once")
    common(create)
    create.add_argument("--name", required=True)
    create.add_argument("--rpm", type=int, default=0, help="requests per minute (0: no limit)")
    create.add_argument("--tpm", type=int, default=0, help="prompt + completion tokens per minute")
    create.add_argument("--streams", type=int, default=0, help="requests in flight at once")
    create.add_argument("--models", default="", help="comma-separated models it may use (default: all)")
    create.add_argument("--expires", default="", help="lifetime like 30d, 12h, 90m (default: never)")
    listing = actions.add_parser("list", help="every key, its limits and state")
    common(listing)
    revoke = actions.add_parser("revoke", help="stop a key working on every gateway")
    common(revoke)
    revoke.add_argument("name")
    usage = actions.add_parser("usage", help="requests and tokens per key, day and model")
    common(usage)
    usage.add_argument("name", nargs="?", help="one key (default: all)")
    usage.add_argument("--json", action="store_true", help="one JSON object per line")
    for p in (create, listing, revoke, usage):
        p.set_defaults(func=run_keys)


def run_keys(args: argparse.Namespace, url: str) -> int:
    if args.nats is None and not os.environ.get("CHATBUS_NATS"):
        # On the machine of a running `chatbus up`: keys are an admin's to make (docs/security.md).
        url = local_url(args.state_dir, "admin") or url
    return asyncio.run(_run(args, url))


async def _run(args: argparse.Namespace, url: str) -> int:
    nc = await connect(url, name="chatbus-keys")
    try:
        js = nc.jetstream()
        kv = await asyncio.wait_for(ensure_keys_bucket(js), 10)
        if args.action == "create":
            models = [m.strip() for m in args.models.split(",") if m.strip()]
            expires = parse_duration(args.expires) if args.expires else 0.0
            secret, record = await create_key(
                kv, args.name, rpm=args.rpm, tpm=args.tpm, max_streams=args.streams, models=models,
                expires_in_s=expires,
            )  # fmt: skip
            print(f"created key {record.name!r} on {redact(url)}; its secret (shown only now):")
            print(secret)
        elif args.action == "list":
            _print_keys(await list_keys(kv))
        elif args.action == "revoke":
            record = await revoke_key(kv, args.name)
            print(f"revoked key {record.name!r}")
        else:
            rows = await list_usage(await asyncio.wait_for(ensure_usage_bucket(js), 10), args.name)
            _print_usage(rows, args.json)
        return 0
    finally:
        await nc.close()


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(t)) if t else "never"


def _print_keys(records: list[KeyRecord]) -> None:
    print(f"{'NAME':<20} {'STATE':<8} {'RPM':>6} {'TPM':>8} {'STREAMS':>7} {'EXPIRES (UTC)':<17} MODELS")
    now = time.time()
    for r in records:
        state = "revoked" if r.revoked else ("live" if r.usable(now) else "expired")
        models = ",".join(r.models) or "*"
        print(
            f"{r.name:<20} {state:<8} {r.rpm:>6} {r.tpm:>8} {r.max_streams:>7} {_when(r.expires_at):<17} {models}"
        )


def _print_usage(rows: list[KeyUsage], as_json: bool) -> None:
    if as_json:
        import msgspec

        for u in rows:
            print(msgspec.json.encode(u).decode())
        return
    print(f"{'KEY':<20} {'DAY':<10} {'MODEL':<28} {'REQUESTS':>8} {'PROMPT':>9} {'COMPLETION':>10}")
    for u in rows:
        print(
            f"{u.key:<20} {u.day:<10} {u.model:<28} {u.requests:>8} {u.prompt_tokens:>9} {u.completion_tokens:>10}"
        )
