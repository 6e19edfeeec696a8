"""`chatbus train submit|list|status|cancel|merge`: fine-tuning jobs from the command line."""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from bus import BusError, JobEvent, JobRecord, Jobs, connect
from trainer.closed_loop import LoopOptions, after_training
from trainer.data import DatasetError, parse_dataset
from trainer.datatools import add_data_commands
from trainer.schemas import TrainSpec

__all__ = ["add_commands", "progress_line"]

# flag → TrainSpec field; a flag left out keeps the spec's default
_KNOBS: list[tuple[str, str, type, str]] = [
    ("--max-steps", "max_steps", int, "optimizer steps (default: from --epochs)"),
    ("--epochs", "epochs", float, "passes over the data (default 3)"),
    ("--lr", "lr", float, "peak learning rate (default 2e-4 LoRA/QLoRA, 2e-5 full)"),
    ("--batch-size", "batch_size", int, "samples per micro-batch (default 2)"),
    ("--grad-accum", "grad_accum", int, "micro-batches per optimizer step (default 8)"),
    ("--max-len", "max_len", int, "tokens per sample; longer ones are truncated (default 512)"),
    ("--lora-r", "lora_r", int, "LoRA rank (default 8)"),
    ("--lora-alpha", "lora_alpha", int, "LoRA alpha (default 16)"),
    ("--lora-dropout", "lora_dropout", float, "LoRA dropout (default 0.05)"),
    ("--warmup-ratio", "warmup_ratio", float, "share of steps spent warming up (default 0.03)"),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay (default 0)"),
    ("--checkpoint-every", "checkpoint_every", int, "steps between checkpoints (default 50)"),
    ("--seed", "seed", int, "data order and init seed (default 42)"),
    ("--dtype", "dtype", str, "auto | bfloat16 | float16 | float32 (default auto)"),
    ("--device", "device", str, "auto | cpu | cuda | mps (default auto)"),
    ("--name", "name", str, "model name to serve the result under"),
]


def add_commands(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    train = sub.add_parser("train", help="fine-tune models with train jobs on the bus")
    tsub = train.add_subparsers(dest="train_command", required=True)

    submit = tsub.add_parser("submit", help="upload a dataset and queue a train job")
    common(submit)
    submit.add_argument(
        "--data", type=Path, required=True, help="ShareGPT or OpenAI-messages JSON / JSON lines"
    )
    submit.add_argument("--base", default="default", help="base model (default: SmolLM2-135M-Instruct)")
    method = submit.add_mutually_exclusive_group()
    for flag, value, text in (
        ("--lora", "lora", "LoRA (default)"),
        ("--qlora", "qlora", "4-bit QLoRA"),
        ("--full", "full", "full fine-tuning"),
    ):
        method.add_argument(flag, dest="method", action="store_const", const=value, help=text)
    for flag, _field, kind, text in _KNOBS:
        submit.add_argument(flag, type=kind, default=None, help=text)
    submit.add_argument(
        "--lora-targets", default=None, help="comma-separated module names (default all-linear)"
    )
    submit.add_argument(
        "--grad-checkpointing", action="store_true", default=None, help="trade compute for memory"
    )
    submit.add_argument("--follow", action="store_true", help="show live progress until the job ends")
    submit.add_argument(
        "--serve", action="store_true", help="then wait until a node serves the result (implies --follow)"
    )
    submit.add_argument(
        "--eval",
        dest="evaluate",
        action="store_true",
        help="then wait for a judge worker to score it against its base, and show both (implies --serve)",
    )
    submit.add_argument(
        "--serve-timeout", type=float, default=300.0, help="seconds to wait for a node (--serve)"
    )
    submit.add_argument(
        "--judge-timeout", type=float, default=60.0, help="seconds to wait for a judge (--eval)"
    )
    submit.set_defaults(func=_submit_interruptible)

    lst = tsub.add_parser("list", help="list train jobs")
    common(lst)
    lst.set_defaults(func=lambda args, url: asyncio.run(cmd_list(url)))

    status = tsub.add_parser("status", help="show one job (with --follow: its live progress)")
    common(status)
    status.add_argument("job_id")
    status.add_argument("--follow", action="store_true")
    status.set_defaults(func=lambda args, url: asyncio.run(cmd_status(args, url)))

    cancel = tsub.add_parser("cancel", help="cancel a queued or running job")
    common(cancel)
    cancel.add_argument("job_id")
    cancel.set_defaults(func=lambda args, url: asyncio.run(cmd_cancel(args, url)))

    merge = tsub.add_parser("merge", help="write base + LoRA adapter merged into plain weights")
    common(merge)
    merge.add_argument("ref", help="train job id or stored model name")
    merge.add_argument("--out", type=Path, required=True, help="directory to write the merged model to")
    merge.add_argument("--cache-dir", type=Path, default=None, help="model cache (default: the nodes' cache)")
    merge.set_defaults(func=lambda args, url: asyncio.run(cmd_merge(args, url)))
    add_data_commands(sub, common)


async def _jobs(url: str) -> Jobs:
    return await Jobs(await connect(url, name="chatbus-train")).start()


def _spec(args: argparse.Namespace, data: str) -> TrainSpec:
    fields: dict[str, Any] = {"data": data, "data_name": args.data.name, "base": args.base}
    fields["method"] = args.method or "lora"
    for _flag, name, _kind, _text in _KNOBS:
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    if args.lora_targets:
        fields["lora_targets"] = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    if args.grad_checkpointing:
        fields["grad_checkpointing"] = True
    return TrainSpec(**fields)


def _submit_interruptible(args: argparse.Namespace, url: str) -> int:
    """Ctrl-C stops the watching, never the jobs: they were accepted by the bus and go on."""
    accepted: list[str] = []
    try:
        return asyncio.run(cmd_submit(args, url, accepted))
    except KeyboardInterrupt:
        if accepted:
            job = accepted[0]
            print(
                f"\ninterrupted; job {job} goes on (nothing was cancelled): `chatbus train status {job} --follow`"
                f"{f', `chatbus eval follow {job}`' if args.evaluate else ''}",
                file=sys.stderr,
            )
        return 130


async def cmd_submit(args: argparse.Namespace, url: str, accepted: list[str] | None = None) -> int:
    try:
        data = args.data.read_bytes()
        parse_dataset(data, args.data.name)  # fail here, not minutes later on a worker
    except OSError as e:
        print(f"error: cannot read {args.data}: {e.strerror}", file=sys.stderr)
        return 2
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    jobs = await _jobs(url)
    try:
        name = await jobs.put_artifact("datasets", data)
        job_id = await jobs.submit("train", _spec(args, name), by="chatbus-cli")
        if accepted is not None:
            accepted.append(job_id)
        print(job_id, flush=True)
        if not (args.follow or args.serve or args.evaluate):
            return 0
        code = await follow(jobs, job_id, hint=not (args.serve or args.evaluate))
        if code or not (args.serve or args.evaluate):
            return code
        opts = LoopOptions(
            evaluate=args.evaluate, serve_timeout_s=args.serve_timeout, judge_timeout_s=args.judge_timeout
        )
        return await after_training(jobs, url, job_id, opts)
    finally:
        await jobs.nc.close()


async def follow(jobs: Jobs, job_id: str, *, hint: bool = True) -> int:
    """Print progress until the job ends; 0 when it is done."""
    tty = sys.stderr.isatty()
    last: JobEvent | None = None
    async for event in jobs.events(job_id):
        last = event
        if event.event == "progress":
            line = progress_line(event.metrics)
            print(f"\r{line}\033[K" if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)
        elif event.event in ("log", "checkpoint", "started") and event.message:
            print(("\n" if tty else "") + f"{event.event}: {event.message}", file=sys.stderr, flush=True)
    print(file=sys.stderr) if tty else None
    if last is None or last.state != "done":
        message = last.message if last else "no events"
        print(f"job {job_id} {last.state if last else 'unknown'}: {message}", file=sys.stderr)
        return 1
    result = last.result or {}
    print(f"done: {result.get('name')} stored as {result.get('artifact')}")
    if hint:
        if result.get("method") == "full":
            print(f"serve it: chatbus node --adapter {job_id}")
        else:  # a LoRA: a running node of its base takes it without a restart
            print(f"serve it: chatbus adapters load {job_id} (or start a node with --adapter {job_id})")
    return 0


def progress_line(m: dict[str, float]) -> str:
    """`step 12/30 [#####.....] loss 0.4321 lr 1.2e-04 410 tok/s ETA 0:15`"""
    step, total = int(m.get("step", 0)), int(m.get("total_steps", 0)) or 1
    filled = int(20 * step / total)
    eta = int(m.get("eta_s", 0))
    return (
        f"step {step}/{total} [{'#' * filled}{'.' * (20 - filled)}] loss {m.get('loss', 0):.4f} "
        f"lr {m.get('lr', 0):.1e} {m.get('tokens_per_s', 0):.0f} tok/s ETA {eta // 60}:{eta % 60:02d}"
    )


def _row(r: JobRecord) -> str:
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r.submitted_at))
    step = f"{int(r.metrics['step'])}" if "step" in r.metrics else "-"
    loss = f"{r.metrics['loss']:.4f}" if "loss" in r.metrics else "-"
    return f"{r.job_id:<34} {r.state:<10} {when:<17} {step:>6} {loss:>8}  {r.message[:40]}"


async def cmd_list(url: str) -> int:
    jobs = await _jobs(url)
    try:
        records = await jobs.list("train")
        if not records:
            print("no train jobs; submit one with `chatbus train submit --data FILE`")
            return 0
        print(f"{'JOB':<34} {'STATE':<10} {'SUBMITTED':<17} {'STEP':>6} {'LOSS':>8}  MESSAGE")
        for record in records:
            print(_row(record))
        return 0
    finally:
        await jobs.nc.close()


async def cmd_status(args: argparse.Namespace, url: str) -> int:
    jobs = await _jobs(url)
    try:
        record = await jobs.get(args.job_id)
        if record is None:
            print(f"error: no job {args.job_id!r}; `chatbus train list` shows the jobs", file=sys.stderr)
            return 1
        if args.follow and record.state not in ("done", "failed", "cancelled"):
            return await follow(jobs, args.job_id)
        spec = msgspec.json.decode(record.spec)
        print(f"job      {record.job_id} ({record.kind}, attempt {record.attempt})")
        print(f"state    {record.state}  {record.message}")
        print(f"spec     {spec}")
        if record.metrics:
            print(f"progress {progress_line(record.metrics)}")
        if record.result:
            print(f"result   {record.result}")
        if record.eval_job:
            scores = ", ".join(f"{m} {v:.2f}" for m, v in record.scores.items()) or "not yet"
            print(f"eval     {record.eval_job}: {scores}")
        return 0
    finally:
        await jobs.nc.close()


async def cmd_cancel(args: argparse.Namespace, url: str) -> int:
    jobs = await _jobs(url)
    try:
        record = await jobs.cancel(args.job_id)
        if record.state in ("done", "failed", "cancelled"):
            print(f"{args.job_id}: already {record.state}, nothing to cancel")
        else:
            print(f"{args.job_id}: cancelled (it was {record.state})")
        return 0
    except BusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        await jobs.nc.close()


async def cmd_merge(args: argparse.Namespace, url: str) -> int:
    """FastChat's apply_lora: base + adapter → one plain model dir any node can serve with --model."""
    from bus import describe_artifact as describe
    from bus import fetch_artifact as fetch_with
    from trainer.__main__ import default_cache_dir
    from trainer.merge import merge_adapter

    jobs = await _jobs(url)
    try:
        with tempfile.TemporaryDirectory(prefix="chatbus-merge-") as tmp:
            adapter = await fetch_with(jobs, args.ref, Path(tmp))
            info = describe(adapter)
            if info.method == "full":
                print("error: that job stored full weights already; nothing to merge", file=sys.stderr)
                return 1
            cache = args.cache_dir or default_cache_dir()
            await asyncio.to_thread(merge_adapter, adapter, info.base, cache, args.out)
        print(f"merged {info.name} into {args.out}; serve it: chatbus node --model {args.out}")
        return 0
    finally:
        await jobs.nc.close()
