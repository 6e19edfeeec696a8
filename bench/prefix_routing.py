"""Cache-aware vs power-of-two routing: TTFT of later turns of multi-turn chats over two nodes.

Run:  python bench/prefix_routing.py [--conversations 16] [--turns 3] [--engine llamacpp] [--max-tokens 16]

Starts an embedded nats-server and two `python -m node --engine E` processes, then plays the same kind
of workload twice through BusClient — once routing cache-aware (BusClient's default), once with
`cache_aware=False` (power of two choices on load only): `--conversations` chats at once, each
`--turns` turns, the first carrying a ~250-token document, a user "think time" of 1-3 heartbeats between
turns. Each mode gets conversations of its own (different documents), so neither finds the other's
history in a cache. Reported: TTFT p50/p90 of the first turns and of the later ones, and how many
later turns landed on the node that answered the turn before.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from load import pct, spawn, stop  # noqa: E402

from bus import BusClient, ChatMessage, SamplingParams  # noqa: E402
from bus.connection import HEARTBEAT_S  # noqa: E402

MODEL = "SmolLM2-135M-Instruct"
FOLLOW_UPS = [
    "Summarise that in one sentence.",
    "What is the main point?",
    "Give one more detail.",
    "Thanks!",
]


def document(mode: str, i: int) -> str:
    line = f"Record {mode}-{i}: the harbour ledger lists ships, cargo and the weather of each day. "
    return line * 14 + "Read this and tell me what it is about."  # ~250 tokens


async def conversation(
    client: BusClient, mode: str, i: int, args: argparse.Namespace, out: dict[str, list[float]]
) -> None:
    history = [ChatMessage(role="user", content=document(mode, i))]
    previous = ""
    for t in range(args.turns):
        stream = client.chat(MODEL, history, SamplingParams(temperature=0, max_tokens=args.max_tokens))
        sent, first = time.perf_counter(), 0.0
        async for _ in stream:
            first = first or time.perf_counter()
        out["first" if t == 0 else "later"].append(first - sent)
        if t:
            out["same"].append(float(stream.node_id == previous))
        previous = stream.node_id
        history += [
            ChatMessage(role="assistant", content=stream.text),
            ChatMessage(role="user", content=FOLLOW_UPS[t % len(FOLLOW_UPS)]),
        ]
        # The user reads (at least one heartbeat: the node says what it holds); jitter breaks lockstep,
        # where least-loaded routing would send each turn back to the node that just finished the last.
        await asyncio.sleep(HEARTBEAT_S * random.uniform(1.0, 3.0))


async def play(url: str, mode: str, cache_aware: bool, args: argparse.Namespace) -> str:
    client = await BusClient.connect(url, name=f"prefix-bench-{mode}", cache_aware=cache_aware)
    out: dict[str, list[float]] = {"first": [], "later": [], "same": []}
    try:
        await asyncio.gather(*(conversation(client, mode, i, args, out) for i in range(args.conversations)))
    finally:
        await client.close()

    def ms(values: list[float]) -> str:
        return f"{1000 * pct(values, 0.5):.0f} / {1000 * pct(values, 0.9):.0f}"

    same = sum(out["same"]) / max(1, len(out["same"]))
    return f"| {mode} | {ms(out['first'])} | {ms(out['later'])} | {100 * same:.0f}% |"


async def main(args: argparse.Namespace) -> None:
    from bus.server import EmbeddedServer

    random.seed(14)
    work = Path(tempfile.mkdtemp(prefix="chatbus-prefix-"))
    server = EmbeddedServer(data_dir=work / "js", port=0, log_file=work / "nats.log")
    server.start()
    procs = []
    try:
        for n in range(2):
            argv = [sys.executable, "-m", "node", "--nats", server.url, "--engine", args.engine]
            argv += ["--node-id", f"prefix-{n}"] + (
                ["--cache-dir", str(args.cache_dir)] if args.cache_dir else []
            )
            procs.append(spawn(argv, work / f"node-{n}.log"))
        async with await BusClient.connect(server.url, name="prefix-bench-wait") as probe:
            while not (MODEL in probe.models() and len(probe.models()[MODEL].nodes) == 2):
                if any(p.poll() is not None for p in procs):
                    raise RuntimeError(f"a node exited; logs in {work}")
                await asyncio.sleep(0.5)
        print(
            f"engine {args.engine}, {args.conversations} conversations × {args.turns} turns, logs in {work}\n"
        )
        print(
            "| routing | TTFT ms turn 1 p50 / p90 | TTFT ms turns 2+ p50 / p90 | later turns on the same node |"
        )
        print("|---|---|---|---|", flush=True)
        print(await play(server.url, "power-of-two", False, args), flush=True)
        print(await play(server.url, "cache-aware", True, args), flush=True)
    finally:
        for proc in procs:
            stop(proc)
        server.stop()


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--conversations", type=int, default=16)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--engine", default="llamacpp", help="node engine (llamacpp reuses cached prompts)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--cache-dir", type=Path, default=None, help="converted-model cache (as python -m node)")
    return p.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse()))
