"""`python -m trainer --nats URL`: a worker that runs train jobs from the bus, one at a time."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from bus import add_nats_option, resolve_nats
from trainer.worker import WorkerConfig, main


def default_cache_dir() -> Path:
    """The same model cache `chatbus up` gives its nodes, so the default model is converted once."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "chatbus" / "models"


def parse(argv: list[str]) -> WorkerConfig:
    p = argparse.ArgumentParser(prog="python -m trainer", description="Run chatbus train jobs from the bus.")
    add_nats_option(p)
    p.add_argument(
        "--cache-dir", type=Path, default=default_cache_dir(), help="model cache (shared with nodes)"
    )
    p.add_argument("--work-dir", type=Path, default=None, help="scratch space for outputs (default: temp)")
    p.add_argument(
        "--ack-wait",
        type=float,
        default=30.0,
        help="seconds before a dead worker's job goes to another worker",
    )
    a = p.parse_args(argv)
    return WorkerConfig(
        nats=resolve_nats(a.nats, os.environ),
        cache_dir=a.cache_dir,
        work_dir=a.work_dir,
        ack_wait_s=a.ack_wait,
        log_format=os.environ.get("CHATBUS_LOG_FORMAT", "text"),
    )


if __name__ == "__main__":
    sys.exit(main(parse(sys.argv[1:])))
