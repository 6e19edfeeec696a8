"""`python -m judge --nats URL`: run an evaluation worker (and the auto-eval triggers)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from bus import BusUnavailable, add_nats_option, resolve_nats, setup_logging
from judge.loop import AdapterEvalConfig
from judge.worker import WorkerConfig, serve


def parse(argv: list[str] | None = None) -> WorkerConfig:
    p = argparse.ArgumentParser(prog="python -m judge", description="Run chatbus evaluation jobs.")
    add_nats_option(p)
    p.add_argument(
        "--ack-wait", type=float, default=30.0, help="seconds before a dead worker's job is redelivered"
    )
    p.add_argument("--no-triggers", action="store_true", help="do not run auto-eval triggers in this worker")
    p.add_argument("--trigger-poll", type=float, default=2.0, help="seconds between trigger checks")
    p.add_argument(
        "--no-adapter-evals", action="store_true", help="do not judge new train results against their base"
    )
    p.add_argument("--adapter-eval-questions", type=int, default=5, help="questions per adapter eval")
    p.add_argument(
        "--adapter-eval-judge", default="", help="judge model of adapter evals (default: the base)"
    )
    p.add_argument("--adapter-eval-max-tokens", type=int, default=256, help="per answer turn")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    adapter_evals = AdapterEvalConfig(
        questions=a.adapter_eval_questions,
        judge=a.adapter_eval_judge,
        max_tokens=a.adapter_eval_max_tokens,
        judge_max_tokens=max(a.adapter_eval_max_tokens, 128),
    )
    setup_logging(logging.DEBUG if a.verbose else logging.INFO, os.environ.get("CHATBUS_LOG_FORMAT"))
    return WorkerConfig(
        nats=resolve_nats(a.nats, os.environ),
        ack_wait_s=a.ack_wait,
        triggers=not a.no_triggers,
        trigger_poll_s=a.trigger_poll,
        adapter_evals=None if a.no_adapter_evals else adapter_evals,
        environ=dict(os.environ),
    )


async def _main(cfg: WorkerConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await serve(cfg, stop)


def main(argv: list[str] | None = None) -> int:
    cfg = parse(argv)
    try:
        asyncio.run(_main(cfg))
    except BusUnavailable as e:
        print(f"judge: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
