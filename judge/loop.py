"""The closed loop's judge side: each model a train job made is judged against its base once served.

A judge worker's `AdapterWatcher` looks at the models served on the bus. When one is the result of a
finished train job (`TrainResult.name`) and its base is served too, it claims the train job's record
(a compare-and-set on `JobRecord.eval_job`, so two workers never judge it twice) and submits an eval
job: the adapter and its base, single mode, on a bounded number of the built-in questions, judged by
the base (or a judge the worker names). When that eval is done, `record_scores` writes each model's
score into the train job's record (`JobRecord.scores`) and appends an `evaluated` event to its events.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import msgspec

from bus import BusClient, JobEvent, JobRecord, Jobs
from judge.rounds import Rounds
from judge.schemas import EvalResult, EvalSpec

__all__ = ["AdapterEvalConfig", "AdapterWatcher", "adapter_spec", "claim_eval", "record_scores", "trained"]

log = logging.getLogger(__name__)

RESCAN_S = 30.0  # the train records are re-read at least this often (and whenever the served set changes)


@dataclass(frozen=True)
class AdapterEvalConfig:
    """How a judge worker evaluates new adapters: bounded so a laptop finishes it in minutes."""

    questions: int = 5  # the first N built-in questions
    judge: str = ""  # a bus model; empty: the adapter's base judges
    max_tokens: int = 256  # per answer turn
    judge_max_tokens: int = 384
    wait_models_s: float = 120.0


def adapter_spec(cfg: AdapterEvalConfig, train_job: str, adapter: str, base: str) -> EvalSpec:
    """Adapter and base answer the same questions; one judge grades both (single mode, 1-10)."""
    return EvalSpec(
        models=[adapter, base],
        judge=cfg.judge or base,
        mode="single",
        max_questions=cfg.questions,
        max_tokens=cfg.max_tokens,
        judge_max_tokens=cfg.judge_max_tokens,
        wait_models_s=cfg.wait_models_s,
        label=f"{adapter} vs its base {base}",
        train_job=train_job,
    )


def trained(record: JobRecord) -> tuple[str, str] | None:
    """(served name, base's served name or "") of a finished train job's result; None if it has none."""
    result: Any = record.result
    if record.kind != "train" or record.state != "done" or not isinstance(result, dict):
        return None
    name, base = str(result.get("name") or ""), str(result.get("base_name") or "")
    if not base:  # a record from before base_name: a hub id or a dir names its base by its last part
        raw = str(result.get("base") or "")
        base = "" if raw in ("", "default") else raw.rstrip("/").rsplit("/", 1)[-1]
    return (name, base) if name else None


async def claim_eval(jobs: Jobs, train_job: str, spec: EvalSpec) -> str | None:
    """Submit `spec` as the train job's evaluation unless one is claimed already; returns the eval job
    id (ours or the earlier one), None when the record changed under us (try again later)."""
    got = await jobs.get_revision(train_job)
    if got is None:
        return None
    record, revision = got
    if record.eval_job:
        return record.eval_job
    eval_id = f"eval-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    if not await jobs.update_record(msgspec.structs.replace(record, eval_job=eval_id), revision):
        return None
    try:
        await jobs.submit("eval", spec, job_id=eval_id, by=f"adapter watch ({train_job})")
    except Exception:  # give the claim back, so a later round (or another worker) tries again
        if (now := await jobs.get_revision(train_job)) is not None and now[0].eval_job == eval_id:
            await jobs.update_record(msgspec.structs.replace(now[0], eval_job=""), now[1])
        raise
    message = f"judging {spec.models[0]} against {spec.baseline or spec.models[-1]}: {eval_id}"
    await jobs.publish_event(
        JobEvent(job_id=train_job, state="done", event="eval", at=time.time(), message=message)
    )
    log.info("train job %s: %s", train_job, message)
    return eval_id


async def record_scores(jobs: Jobs, eval_job: str, spec: EvalSpec, result: EvalResult) -> None:
    """Write the eval's scores into its train job's record and events (retried on a concurrent write)."""
    for _ in range(10):
        got = await jobs.get_revision(spec.train_job)
        if got is None:
            log.warning("eval %s: train job %s is gone; scores not recorded", eval_job, spec.train_job)
            return
        record, revision = got
        # updated_at stays: it says when the training ended (nodes serve results newer than themselves)
        updated = msgspec.structs.replace(
            record, eval_job=record.eval_job or eval_job, scores=dict(result.scores)
        )
        if await jobs.update_record(updated, revision):
            break
        await asyncio.sleep(0.2)
    else:  # the eval itself is fine: its result keeps the scores
        log.warning(
            "eval %s: train job %s kept changing; scores not recorded there", eval_job, spec.train_job
        )
        return
    text = ", ".join(f"{m} {s:.2f}" for m, s in result.scores.items()) or "no usable judgment"
    await jobs.publish_event(
        JobEvent(
            job_id=spec.train_job,
            state="done",
            event="evaluated",
            at=time.time(),
            message=f"{eval_job}: {text}",
            metrics=dict(result.scores),
        )
    )


class AdapterWatcher(Rounds):
    """Polls the served models; claims and submits one evaluation per finished train job served."""

    what = "adapter evals"

    def __init__(self, client: BusClient, jobs: Jobs, cfg: AdapterEvalConfig, poll_s: float = 2.0) -> None:
        self.client = client
        self.jobs = jobs
        self.cfg = cfg
        super().__init__(poll_s)
        self._served: set[str] = set()
        self._scanned = 0.0

    def _bases(self) -> dict[str, str]:
        """Served adapters whose node names their base (ModelCard.base)."""
        return {c.name: c.base for n in self.client.nodes() for c in n.models if c.base}

    async def tick(self) -> list[str]:
        """One round; returns the eval jobs submitted."""
        served = set(self.client.models())
        if served == self._served and time.monotonic() - self._scanned < RESCAN_S:
            return []
        self._served, self._scanned = served, time.monotonic()
        bases = self._bases()
        submitted = []
        for record in await self.jobs.list("train"):
            found = trained(record)
            if record.eval_job or found is None or found[0] not in served:
                continue
            adapter, base = found[0], bases.get(found[0]) or found[1]
            if not base or base not in served or (self.cfg.judge and self.cfg.judge not in served):
                continue  # when the base (or the judge) comes, the served set changes: looked at again
            spec = adapter_spec(self.cfg, record.job_id, adapter, base)
            eval_id = await claim_eval(self.jobs, record.job_id, spec)
            if eval_id is None:
                self._scanned = 0.0  # the record changed under us: look again next round
            else:
                submitted.append(eval_id)
        return submitted
