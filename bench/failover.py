"""Failover time: a node is SIGKILLed or SIGSTOPped mid-stream; seconds to the next token, which
comes from the other node. Prints p50/p90/max per signal over `--kills` rounds; never asserts.

Run:  python bench/failover.py [--kills 20] [--signals KILL,STOP] [--max-tokens 60]

It starts its own system on loopback: an embedded nats-server and two `python -m node` processes
serving the default model, and asks them through a BusClient (the gateway's client). Each round
starts a greedy answer on the victim node (alternating), signals the victim after 3 chunks, and
times the gap to the 4th. A SIGKILLed node is restarted (and awaited) before the next round; a
SIGSTOPped one is continued. It also says how often the answer, continued on the other node, came
out the same as an undisturbed run of the same prompt (greedy continuation of the text so far).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bus import BusClient, ChatMessage, Chunk, Done, SamplingParams  # noqa: E402
from bus.server import EmbeddedServer, stop_process_group  # noqa: E402

MODEL = "SmolLM2-135M-Instruct"
PROMPT = [ChatMessage(role="user", content="Write a long story about a dragon who learns to bake bread.")]


def start_node(url: str, node_id: str, cache: str, logs: Path) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "node", "--model", "default", "--nats", url, "--node-id", node_id]
    if cache:
        argv += ["--cache-dir", cache]
    with open(logs / f"{node_id}.log", "ab") as out:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        return subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True
        )


async def wait_listed(client: BusClient, procs: dict[str, subprocess.Popen[bytes]], timeout: float = 300) -> None:  # fmt: skip
    """Until every node's heartbeat comes from its current process (not a killed one's last beat)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = client.models().get(MODEL)
        if entry and {(n, p.pid) for n, p in procs.items()} <= {(n.node_id, n.pid) for n in entry.nodes}:
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"nodes {sorted(procs)} did not come up")


async def one_round(client: BusClient, victim: subprocess.Popen[bytes], victim_id: str, sig: int, params: SamplingParams) -> tuple[float, str, list[str]]:  # fmt: skip
    """(seconds from the signal to the next token, the whole answer, nodes used)."""
    for _ in range(100):
        stream = client.chat(MODEL, PROMPT, params)
        await stream.start()
        if stream.node_id == victim_id:
            break
        await stream.aclose()
    else:
        raise RuntimeError(f"no answer landed on {victim_id}")
    seen, signalled, gap = 0, 0.0, float("nan")
    async for event in stream:
        if isinstance(event, Chunk):
            seen += 1
            if seen == 3:
                os.killpg(victim.pid, sig)
                signalled = time.monotonic()
            elif seen == 4:
                gap = time.monotonic() - signalled
    if not isinstance(stream.result, Done):
        raise RuntimeError(f"the answer failed: {stream.result}")
    return gap, stream.text, stream.nodes_used


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


async def main(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="chatbus-failover-"))
    server = EmbeddedServer(data_dir=work / "js", port=0, log_file=work / "nats.log")
    server.start()
    ids = ["fo-a", "fo-b"]
    procs = {n: start_node(server.url, n, args.cache_dir, work) for n in ids}
    client = await BusClient.connect(server.url, name="bench-failover")
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    try:
        await wait_listed(client, procs)
        reference = "".join(
            [e.text async for e in client.chat(MODEL, PROMPT, params) if isinstance(e, Chunk)]
        )
        print(
            f"{'signal':<8} {'rounds':>6} {'p50 s':>7} {'p90 s':>7} {'max s':>7} {'moved':>6} {'same text':>9}"
        )
        for name in args.signals.split(","):
            sig = getattr(signal, f"SIG{name.strip().upper()}")
            gaps, moved, same = [], 0, 0
            for i in range(args.kills):
                victim_id = ids[i % 2]
                gap, text, used = await one_round(client, procs[victim_id], victim_id, sig, params)
                gaps.append(gap)
                moved += used == [victim_id, ids[(i + 1) % 2]]
                same += text == reference
                if sig == signal.SIGKILL:
                    procs[victim_id].wait()
                    procs[victim_id] = start_node(server.url, victim_id, args.cache_dir, work)
                else:
                    os.killpg(procs[victim_id].pid, signal.SIGCONT)
                await asyncio.sleep(2.5)  # a continued node beats again
                await wait_listed(client, procs)
                print(f"  {name} round {i + 1}: {gap:.2f} s", file=sys.stderr)
            print(
                f"SIG{name:<5} {len(gaps):>6} {pct(gaps, 0.5):>7.2f} {pct(gaps, 0.9):>7.2f} {max(gaps):>7.2f} "
                f"{moved:>6} {same:>9}"
            )
    finally:
        await client.close()
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGCONT)
            stop_process_group(proc, 30)
        server.stop()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=20, help="rounds per signal")
    p.add_argument("--signals", default="KILL,STOP")
    p.add_argument("--max-tokens", type=int, default=60)
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "chatbus-test"))
    asyncio.run(main(p.parse_args()))
