"""`chatbus adapters load|unload|list`: LoRA adapters served per row by running nodes, no restart."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bus import BusClient, BusError
from bus.auth import redact
from bus.schemas_adapters import AdapterCommand, AdapterReply

__all__ = ["add_parser"]


def add_parser(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("adapters", help="load, unload and list LoRA adapters on running nodes (no restart)")
    asub = p.add_subparsers(dest="adapters_command", required=True)
    load = asub.add_parser(
        "load", help="serve a LoRA beside its base: a train job, an artifact or a PEFT dir"
    )
    common(load)
    load.add_argument(
        "ref", help="train job id, `models/<digest>` artifact, or a PEFT dir on the node's machine"
    )
    load.add_argument(
        "--name", default="", help="serve it under this name (default: the job's name / dir name)"
    )
    load.add_argument(
        "--node", default=None, help="only this node (default: every node of the adapter's base)"
    )
    load.set_defaults(func=lambda args, url: asyncio.run(load_cmd(url, _ref(args.ref), args.name, args.node)))
    unload = asub.add_parser("unload", help="stop serving an adapter (its running answers finish)")
    common(unload)
    unload.add_argument("name")
    unload.add_argument("--node", default=None, help="only this node (default: every node serving it)")
    unload.set_defaults(func=lambda args, url: asyncio.run(unload_cmd(url, args.name, args.node)))
    lst = asub.add_parser("list", help="the adapters each node serves")
    common(lst)
    lst.set_defaults(func=lambda args, url: asyncio.run(list_cmd(url)))


def _ref(ref: str) -> str:
    """A local dir as an absolute path: the node reads it from its own disk (same machine, or shared)."""
    local = Path(ref).expanduser()
    return str(local.resolve()) if local.is_dir() else ref


async def _client(url: str) -> BusClient:
    client = await BusClient.connect(url, name="chatbus-adapters")
    if not client.nodes():  # a node may be between heartbeats right after start
        await asyncio.sleep(0.5)
    return client


def _node_ids(client: BusClient, only: str | None, model: str | None = None) -> list[str]:
    ids = [n.node_id for n in client.nodes() if model is None or any(c.name == model for c in n.models)]
    ids = list(dict.fromkeys(ids))
    return [only] if only else ids


async def _each(client: BusClient, nodes: list[str], command: AdapterCommand) -> list[AdapterReply]:
    """Send `command` to each node; print what each said; the replies of those that did it."""
    done = []
    for node_id, outcome in zip(
        nodes,
        await asyncio.gather(*(client.adapters(n, command) for n in nodes), return_exceptions=True),
        strict=True,
    ):
        if isinstance(outcome, AdapterReply):
            done.append(outcome)
            if outcome.message:
                print(f"{node_id}: {outcome.message}")
        elif isinstance(outcome, BusError):
            print(f"{node_id}: {outcome.message}", file=sys.stderr)
        else:
            raise outcome
    return done


async def load_cmd(url: str, ref: str, name: str, node: str | None) -> int:
    client = await _client(url)
    try:
        nodes = _node_ids(client, node)
        if not nodes:
            print(
                f"no nodes on {redact(url)}: start one with `chatbus up` or `chatbus node`", file=sys.stderr
            )
            return 1
        done = await _each(client, nodes, AdapterCommand(action="load", ref=ref, name=name))
        return 0 if done else 1
    finally:
        await client.close()


async def unload_cmd(url: str, name: str, node: str | None) -> int:
    client = await _client(url)
    try:
        nodes = _node_ids(client, node, name)
        if not nodes:
            served = sorted(client.models())
            print(f"no node serves {name!r}; served: {', '.join(served) or 'nothing'}", file=sys.stderr)
            return 1
        done = await _each(client, nodes, AdapterCommand(action="unload", name=name))
        return 0 if done else 1
    finally:
        await client.close()


async def list_cmd(url: str) -> int:
    client = await _client(url)
    try:
        nodes = _node_ids(client, None)
        if not nodes:
            print(f"no nodes on {redact(url)}", file=sys.stderr)
            return 1
        replies = await _each(client, nodes, AdapterCommand(action="list"))
        print(f"{'ADAPTER':<32} {'BASE':<24} {'NODE':<36} {'RANK':>4} {'MIB':>6} {'RUN':>4} {'IDLE S':>7}")
        for reply in replies:
            for a in reply.adapters:
                state = " (unloading)" if a.unloading else ""
                print(
                    f"{a.name:<32} {a.base:<24} {reply.node_id:<36} {a.rank:>4} {a.mib:>6.1f} {a.running:>4} "
                    f"{a.idle_s:>7.0f}{state}"
                )
        return 0
    finally:
        await client.close()
