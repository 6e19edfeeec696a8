"""Processes bench/chaos.py kills that are not `python -m node` / `python -m gateway`: a node around
the scripted echo engine (fast soaks in the test suite) and a job worker running scripted jobs.

Run:  python bench/chaos_parts.py echo-node --nats URL --node-id ID [--model echo] [--step 0.02]
      python bench/chaos_parts.py worker --nats URL [--ack-wait 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from pathlib import Path

import msgspec

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from bus.connection import connect  # noqa: E402
from bus.jobs import JobContext, JobWorker  # noqa: E402


class SoakJob(msgspec.Struct, frozen=True):
    """A job whose result is known: it reports `steps` progress events and answers `payload`."""

    payload: str
    steps: int = 10
    step_s: float = 0.2


async def soak_job(ctx: JobContext) -> msgspec.Raw:
    spec = msgspec.json.decode(ctx.submit.spec, type=SoakJob)
    for i in range(spec.steps):
        ctx.check_cancelled()
        await asyncio.sleep(spec.step_s)
        await ctx.emit("progress", progress=(i + 1) / spec.steps)
    return msgspec.Raw(msgspec.json.encode({"payload": spec.payload}))


async def until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def echo_node(args: argparse.Namespace) -> None:
    from fakes import EchoEngine

    from node.service import NodeService

    nc = await connect(args.nats, name=f"chaos-echo {args.node_id}")
    engine = EchoEngine(args.model, step_s=args.step, max_running=16)
    service = NodeService(nc, engine, node_id=args.node_id, max_queued=64)  # type: ignore[arg-type]
    await service.start()
    print(f"echo node {args.node_id} serving {args.model}", flush=True)
    await until_signalled()
    await service.drain(timeout=10)
    await nc.close()


async def worker(args: argparse.Namespace) -> None:
    nc = await connect(args.nats, name="chaos-worker")
    jobs = JobWorker(nc, "eval", soak_job, ack_wait_s=args.ack_wait)
    task = asyncio.create_task(jobs.run())
    print("worker running", flush=True)
    await until_signalled()
    jobs.stop()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(task, 10)
    await nc.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("part", choices=["echo-node", "worker"])
    p.add_argument("--nats", required=True)
    p.add_argument("--node-id", default="chaos-echo")
    p.add_argument("--model", default="echo")
    p.add_argument("--step", type=float, default=0.02, help="seconds per echoed word")
    p.add_argument("--ack-wait", type=float, default=3.0, help="a dead worker's job is redelivered after")
    args = p.parse_args()
    asyncio.run(echo_node(args) if args.part == "echo-node" else worker(args))


if __name__ == "__main__":
    main()
