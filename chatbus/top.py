"""`chatbus top`: a live terminal view of the nodes (load, throughput, KV use, prefix hits) from the bus."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from bus import BusClient, MetricsView, NodeInfo, NodeMetrics, ensure_metrics_bucket, redact

__all__ = ["add_parser", "render", "run_top"]

_CLEAR = "\x1b[H\x1b[2J"


def add_parser(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("top", help="live view of the nodes: load, tok/s, KV use, prefix hits (Ctrl-C quits)")
    common(p)
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    p.add_argument("--once", action="store_true", help="print one table and exit")
    p.set_defaults(func=run_top)


def run_top(args: argparse.Namespace, url: str) -> int:
    return asyncio.run(top(url, args.interval, args.once, sys.stdout))


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "-"


def render(url: str, nodes: list[NodeInfo], metrics: dict[str, NodeMetrics], rates: dict[str, float]) -> str:
    """The table: one row per live node; metrics columns from its latest snapshot, if any."""
    lines = [
        f"chatbus top — {redact(url)} — {len(nodes)} node(s) — {time.strftime('%H:%M:%S')}",
        "",
        f"{'MODEL':<24} {'NODE':<34} {'DEVICE':<7} {'RUN':>4} {'WAIT':>4} {'TOK/S':>7} {'KV':>5} "
        f"{'PREFIX':>6} {'REQ/S':>6} {'DONE':>6} {'FAIL':>5} {'GEN TOK':>9}",
    ]
    for n in sorted(nodes, key=lambda n: (n.models[0].name if n.models else "", n.node_id)):
        m = metrics.get(n.node_id)
        model = ",".join(c.name for c in n.models)
        kv = _pct(m.kv_cache_usage, 1.0) if m and m.kv_cache_usage else "-"
        prefix = _pct(m.prefix_cache_hits, m.prefix_cache_queries) if m else "-"
        done = sum(m.success.values()) if m else 0
        fail = sum(m.failure.values()) if m else 0
        gen = m.generation_tokens if m else 0
        lines.append(
            f"{model[:24]:<24} {n.node_id[:34]:<34} {n.device[:7]:<7} {n.running:>4} {n.queued:>4} "
            f"{n.tokens_per_s:>7.1f} {kv:>5} {prefix:>6} {rates.get(n.node_id, 0.0):>6.2f} {done:>6} "
            f"{fail:>5} {gen:>9}"
        )
    if not nodes:
        lines.append("(no nodes: start one with `chatbus node` or `chatbus up`)")
    return "\n".join(lines) + "\n"


async def top(url: str, interval: float, once: bool, out: TextIO) -> int:
    client = await BusClient.connect(url, name="chatbus-top")
    view = MetricsView(await client.bucket(ensure_metrics_bucket), client.reconnects)
    try:
        await view.start()
        if not client.nodes():  # a node may be between heartbeats right after we connect
            await asyncio.sleep(0.5)
        before: dict[str, tuple[int, float]] = {}
        while True:
            metrics = {m.node_id: m for m in view.nodes()}
            now, rates = time.monotonic(), {}
            for node_id, m in metrics.items():
                done = sum(m.success.values()) + sum(m.failure.values())
                if node_id in before:
                    then_done, then = before[node_id]
                    rates[node_id] = (done - then_done) / max(1e-6, now - then)
                before[node_id] = (done, now)
            out.write(("" if once else _CLEAR) + render(url, client.nodes(), metrics, rates))
            out.flush()
            if once:
                return 0
            await asyncio.sleep(interval)
    finally:
        await view.stop()
        await client.close()
