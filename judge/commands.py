"""`chatbus eval ...`: submit, follow, results, agreement, export, list/status/cancel, auto-eval triggers."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from judge import ops
from judge.schemas import MODES

__all__ = ["add_commands"]


def _spec_options(p: argparse.ArgumentParser, *, models_required: bool) -> None:
    p.add_argument("--models", required=models_required, default="", help="comma-separated bus model names")
    p.add_argument("--judge", required=True, help="judge model (a bus model, or the endpoint's model name)")
    p.add_argument("--judge-base-url", default="", help="judge through this OpenAI-compatible endpoint")
    p.add_argument(
        "--judge-api-key-env", default="", help="env var holding the endpoint key (on the judge worker)"
    )
    p.add_argument("--mode", choices=MODES, default="single")
    p.add_argument("--baseline", default="", help="the opponent in pairwise-baseline mode")
    p.add_argument(
        "--questions", type=Path, default=None, help="FastChat question JSONL (default: built-in set)"
    )
    p.add_argument("--references", type=Path, default=None, help="FastChat answer JSONL used as references")
    p.add_argument("--question-ids", default="", help="comma-separated question ids to keep")
    p.add_argument("--max-questions", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=1024, help="per answer turn")
    p.add_argument("--judge-max-tokens", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=None, help="default: per category, as FastChat")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per answer turn / judge call")
    p.add_argument("--wait-models", type=float, default=60.0, help="seconds to wait for the models to appear")
    p.add_argument("--label", default="")


def _handler(fn: Callable[..., Any]) -> Callable[[argparse.Namespace, str], int]:
    def run(args: argparse.Namespace, url: str) -> int:
        try:
            return int(asyncio.run(fn(args, url)))
        except ValueError as e:  # a user's mistake in a file or an option
            print(f"error: {e}")
            return 2

    return run


def add_commands(sub: argparse._SubParsersAction, common: Callable[[argparse.ArgumentParser], None]) -> None:
    ev = sub.add_parser("eval", help="MT-bench-style evaluations as bus jobs (LLM as a judge)")
    evs = ev.add_subparsers(dest="eval_command", required=True)

    def cmd(name: str, help_: str, fn: Callable[..., Any]) -> argparse.ArgumentParser:
        p = evs.add_parser(name, help=help_)
        common(p)
        p.set_defaults(func=_handler(fn))
        return p

    p = cmd("submit", "submit an evaluation job", ops.submit)
    _spec_options(p, models_required=True)
    p.add_argument("--follow", action="store_true", help="show progress, then the result tables")

    p = cmd("results", "print the result tables of a job (or of a judgment file)", ops.results)
    p.add_argument("job", nargs="?", default="", help="eval job id (or a train job id: its adapter's eval)")
    p.add_argument("--file", type=Path, default=None, help="a judgment JSONL instead of a job")
    p.add_argument("--baseline", default=None, help="leave this model out of the pairwise table")

    p = cmd("agreement", "how often two judges agree (job ids or judgment files)", ops.agreement)
    p.add_argument("first")
    p.add_argument("second")

    p = cmd("export", "write questions, answers and judgments as FastChat JSONL files", ops.export)
    p.add_argument("job")
    p.add_argument("--out", type=Path, required=True, help="folder (model_answer/, model_judgment/)")

    p = cmd("list", "list evaluation jobs", ops.list_jobs)
    p = cmd("status", "one job's state, progress and failures", ops.status)
    p.add_argument("job")
    p = cmd("cancel", "cancel an evaluation job", ops.cancel)
    p.add_argument("job")
    p = cmd("follow", "follow a job's progress until it ends", ops.follow)
    p.add_argument("job", help="eval job id (or a train job id: its adapter's eval)")

    p = cmd("watch", "evaluate every new model that appears on the bus (run by the judge worker)", ops.watch)
    _spec_options(p, models_required=False)
    p.add_argument("--match", default="*", help="only models whose name matches this pattern (fnmatch)")
    p.add_argument("--include-current", action="store_true", help="also evaluate models served right now")
    p = cmd("triggers", "list auto-eval triggers", ops.triggers)
    p = cmd("unwatch", "remove an auto-eval trigger", ops.unwatch)
    p.add_argument("trigger")
