"""The train-job worker: pull a job, train it in a thread, report steps, checkpoint to and resume from the Object Store.

A job's checkpoint lives at `ckpt/<job_id>` (overwritten in place); any attempt that finds one resumes
from it, so a job redelivered after a crash (or handed back on shutdown) does not start over.
The result (adapter or full model dir, as a tar) is content-addressed under `models/`, its spec +
data report under `train/<job_id>/config.json` and the per-step metrics under `train/<job_id>/metrics.jsonl`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import io
import json
import logging
import signal
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from bus import (
    DEFAULT_NATS,
    ArtifactInfo,
    JobCancelled,
    JobContext,
    JobWorker,
    connect,
    encode,
    redact,
    setup_logging,
    write_info,
)
from trainer.model import DEFAULT_MODEL, base_name
from trainer.schemas import TrainResult, TrainSpec

# Every job trains on this one thread: torch on a second thread would start a second OpenMP team,
# and libgomp then throttles both (node/packing.py's one_thread says why; bench/omp_team.py).
_TORCH = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="trainer-torch")

__all__ = ["WorkerConfig", "checkpoint_name", "handle", "main", "serve"]

log = logging.getLogger("trainer")
EMIT_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class WorkerConfig:
    nats: str = DEFAULT_NATS
    cache_dir: Path = Path(".cache/chatbus/models")
    work_dir: Path | None = None  # where jobs write their outputs before upload (default: a temp dir)
    ack_wait_s: float = 30.0
    log_format: str = "text"  # or json (bus.logfmt)


def say(line: str) -> None:
    print(f"[trainer] {line}", file=sys.stderr, flush=True)


def checkpoint_name(job_id: str) -> str:
    return f"ckpt/{job_id}"


def tar_dir(path: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for item in sorted(path.iterdir()):
            tar.add(item, arcname=item.name)
    return buffer.getvalue()


async def handle(ctx: JobContext, cfg: WorkerConfig) -> msgspec.Raw:
    """Run one train job to its end; raises JobCancelled when cancelled or handed back."""
    from trainer.train import Hooks, run  # torch loads here, not when the CLI imports this package

    spec = msgspec.json.decode(ctx.submit.spec, type=TrainSpec)
    loop = asyncio.get_running_loop()
    dataset = await ctx.jobs.get_artifact(spec.data)
    ckpt_name = checkpoint_name(ctx.job_id)
    checkpoint = await ctx.jobs.get_artifact(ckpt_name) if await ctx.jobs.has_artifact(ckpt_name) else None

    def call(coro: Any) -> Any:  # from the training thread: run on the loop and wait, so events stay in order
        return asyncio.run_coroutine_threadsafe(coro, loop).result(EMIT_TIMEOUT_S)

    def progress(metrics: dict[str, float]) -> None:
        done = metrics["step"] / max(1.0, metrics["total_steps"])
        call(ctx.emit("progress", progress=done, metrics=metrics))

    def store_checkpoint(step: int, blob: bytes) -> None:
        call(ctx.jobs.put_named(ckpt_name, blob))
        call(
            ctx.emit(
                "checkpoint", metrics={"step": float(step)}, artifacts=[ckpt_name], message=f"step {step}"
            )
        )

    def stop() -> str | None:
        if ctx.cancelled.is_set():
            return "cancel"
        return "shutdown" if ctx.stopping.is_set() else None

    def log_line(line: str) -> None:
        say(f"{ctx.job_id}: {line}")
        call(ctx.emit("log", message=line))

    hooks = Hooks(progress=progress, checkpoint=store_checkpoint, stop=stop, log=log_line)
    with tempfile.TemporaryDirectory(prefix="chatbus-train-", dir=cfg.work_dir) as tmp:
        out_dir = Path(tmp) / "out"
        outcome = await asyncio.get_running_loop().run_in_executor(
            _TORCH,
            functools.partial(
                run,
                spec,
                dataset,
                cache_dir=cfg.cache_dir,
                out_dir=out_dir,
                hooks=hooks,
                checkpoint=checkpoint,
            ),
        )
        if outcome.stopped:
            raise JobCancelled(ctx.job_id)
        name = spec.name or f"{base_name(spec.base)}-{ctx.job_id.rsplit('-', 1)[-1]}"
        write_info(out_dir, ArtifactInfo(name=name, base=spec.base, method=spec.method, job_id=ctx.job_id))
        if spec.method != "full":
            _point_adapter_at_base(out_dir, spec.base)
        t_store = time.perf_counter()
        artifact = await ctx.jobs.put_artifact("models", await asyncio.to_thread(tar_dir, out_dir))
        say(
            f"{ctx.job_id}: trained {outcome.steps} steps in {outcome.seconds:.1f} s, stored in {time.perf_counter() - t_store:.1f} s"
        )
    await ctx.jobs.delete_artifact(ckpt_name)  # the model is stored: its checkpoint is dead weight
    config = await ctx.jobs.put_named(
        f"train/{ctx.job_id}/config.json",
        json.dumps({"spec": msgspec.to_builtins(spec), "data": msgspec.to_builtins(outcome.report)}).encode(),
    )
    metrics = await ctx.jobs.put_named(
        f"train/{ctx.job_id}/metrics.jsonl", "".join(json.dumps(m) + "\n" for m in outcome.history).encode()
    )
    result = TrainResult(
        method=spec.method,
        base=spec.base,
        base_name=base_name(spec.base),
        name=name,
        artifact=artifact,
        config=config,
        metrics=metrics,
        steps=outcome.steps,
        final_loss=outcome.final_loss,
        first_loss=outcome.first_loss,
        tokens=outcome.tokens,
        seconds=outcome.seconds,
        resumed_from=outcome.resumed_from,
        data=outcome.report,
    )
    await ctx.emit(
        "log", message=f"stored {artifact} (serve it as {name!r})", artifacts=[artifact, config, metrics]
    )
    return msgspec.Raw(encode(result))


def _point_adapter_at_base(out_dir: Path, base: str) -> None:
    """peft records the local path it loaded the base from; record the base as the user named it."""
    path = out_dir / "adapter_config.json"
    if path.is_file():
        config = json.loads(path.read_text())
        config["base_model_name_or_path"] = DEFAULT_MODEL if base in ("", "default") else base
        path.write_text(json.dumps(config, indent=2))


async def serve(cfg: WorkerConfig) -> None:
    nc = await connect(cfg.nats, name="chatbus-trainer")

    async def handler(ctx: JobContext) -> msgspec.Raw:
        say(f"job {ctx.job_id} (attempt {ctx.attempt})")
        started = time.perf_counter()
        try:
            return await handle(ctx, cfg)
        finally:
            say(f"job {ctx.job_id} ended after {time.perf_counter() - started:.0f} s")

    worker = JobWorker(nc, "train", handler, ack_wait_s=cfg.ack_wait_s)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, worker.stop)
    say(f"waiting for train jobs on {redact(cfg.nats)}")
    try:
        await worker.run()
    finally:
        await nc.drain()
    say("stopped")


def main(cfg: WorkerConfig) -> int:
    setup_logging(logging.WARNING, cfg.log_format, "%(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(cfg))
    except Exception as e:  # BusUnavailable and friends: one line that says what to do
        say(f"error: {e}")
        return 1
    return 0
