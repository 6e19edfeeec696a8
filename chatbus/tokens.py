"""`chatbus node-token` and `chatbus worker-token`: issue, list and revoke one credential per node or worker."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bus import BusUnavailable, bucket_entries, connect, local_url, redact, subjects
from bus import issue_node_token as issue
from bus import issued_credentials as issued
from bus import revoke_node_token as revoke

__all__ = ["add_commands", "forget_node"]


def add_commands(sub: argparse._SubParsersAction, common: Callable[[argparse.ArgumentParser], None]) -> None:  # type: ignore[type-arg,unused-ignore]
    for role in ("node", "worker"):
        p = sub.add_parser(f"{role}-token", help=f"issue, list or revoke a credential of one {role}")
        actions = p.add_subparsers(dest="action", required=True)
        create = actions.add_parser("create", help=f"a new {role} credential: writes its file (0600)")
        common(create)
        create.add_argument("--name", required=True, help="who it is for, e.g. alice-laptop")
        if role == "node":
            create.add_argument(
                "--models", default=None, help="comma-separated models it may serve (default: any)"
            )
            create.add_argument(
                "--adapters", action="store_true", help="it may read the artifact store (to serve --adapter)"
            )
            create.add_argument(
                "--leaf",
                action="store_true",
                help="for a laptop's nats-server to join through a leafnode (docs/security.md)",
            )
        else:
            create.add_argument(
                "--kind",
                action="append",
                choices=["train", "eval"],
                help="jobs it takes (repeatable; default both)",
            )
        create.add_argument("--url", default=None, help="the bus URL to put in the file (default: this bus)")
        create.add_argument("--out", type=Path, default=None, help="where to write the file")
        listing = actions.add_parser("list", help=f"the {role} credentials issued here")
        common(listing)
        gone = actions.add_parser("revoke", help="disconnect it now and refuse it from then on")
        common(gone)
        gone.add_argument("name")
        p.set_defaults(func=lambda args, url, role=role: run(args, role))


def run(args: argparse.Namespace, role: str) -> int:
    action = {"list": _list, "create": _create, "revoke": _revoke}[args.action]
    return action(args, role, args.state_dir)


def _list(args: argparse.Namespace, role: str, state: Path) -> int:
    creds = [c for c in issued(state).values() if c.role == role]
    if not creds:
        print(f"no {role} credentials issued; `chatbus {role}-token create --name NAME` makes one")
    for c in sorted(creds, key=lambda c: c.created):
        allowed = ",".join(c.models or c.kinds or []) or "any"
        extra = ("  adapters" if c.adapters else "") + ("  leaf" if c.leaf else "")
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(c.created))
        what = "models" if role == "node" else "jobs"
        print(f"{c.name:<24} user {c.user:<32} {what} {allowed}{extra}  issued {when}")
    return 0


def _create(args: argparse.Namespace, role: str, state: Path) -> int:
    models = getattr(args, "models", None)
    try:
        cred, path = issue(
            state,
            args.name,
            role,
            models=[m.strip() for m in models.split(",") if m.strip()] if models else None,
            adapters=getattr(args, "adapters", False),
            kinds=getattr(args, "kind", None),
            leaf=getattr(args, "leaf", False),
            url=args.url,
            out=args.out,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{role} credential {cred.name} (NATS user {cred.user}) written to {path}")
    if role == "node":
        print(f"on the node's machine: chatbus node --creds {path.name} --nats nats://BUS-HOST:4222")
    else:
        print(
            f"on the worker's machine: CHATBUS_NATS='nats://BUS-HOST:4222?creds={path.name}' python -m trainer"
        )
    _say_reload(state)
    return 0


def _revoke(args: argparse.Namespace, role: str, state: Path) -> int:
    try:
        cred = revoke(state, args.name)
    except KeyError:
        print(
            f"error: no credential named {args.name!r}; `chatbus {role}-token list` shows them",
            file=sys.stderr,
        )
        return 1
    print(f"revoked {cred.name}: the server refuses {cred.user} from now on")
    if cred.role == "node":
        asyncio.run(forget_node(state, cred.name))
    _say_reload(state)
    return 0


def _say_reload(state: Path) -> None:
    if not (state / "auth" / "nats.pid").exists():
        print(
            f"no `chatbus up` server runs with {state}: copy the users of {state / 'auth' / 'nats.conf'} "
            "into your server's config and run `nats-server --signal reload`"
        )


async def forget_node(state: Path, node_id: str) -> None:
    """Delete a revoked node's heartbeats, so clients stop routing to it now, not after their TTL."""
    url = local_url(state, "admin")
    if url is None:
        return
    try:
        nc = await connect(url, name="chatbus-node-token", timeout=3)
    except BusUnavailable:
        return  # no bus runs: nothing to remove
    try:
        kv = await nc.jetstream().key_value(subjects.NODES_BUCKET)
        for entry in await bucket_entries(kv, f"{subjects.kv_token(node_id)}."):
            await kv.delete(entry.key)
            print(f"removed {entry.key} from the node table on {redact(url)}")
    except Exception as e:  # clients drop it anyway once its heartbeats stop (within their TTL)
        print(f"could not remove {node_id} from the node table ({e!r}); it goes when its heartbeats expire")
    finally:
        await nc.close()
