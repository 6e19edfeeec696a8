"""Auto-evaluation: registered triggers submit an eval job when a matching model first appears on the bus."""

from __future__ import annotations

import fnmatch
import logging
import time
import uuid

import msgspec
from nats.js.kv import KeyValue

from bus import BusClient, Jobs, bucket_entries, ensure_triggers_bucket
from judge.rounds import Rounds
from judge.schemas import EvalSpec, EvalTrigger

__all__ = ["TriggerStore", "TriggerWatcher", "spec_for"]

log = logging.getLogger(__name__)


class TriggerStore:
    """Triggers in the `cb_eval_triggers` KV bucket; claiming a model is a compare-and-set, so two
    workers never submit the same evaluation."""

    def __init__(self, client: BusClient) -> None:
        self.client = client
        self._kv: KeyValue | None = None

    async def kv(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self.client.bucket(ensure_triggers_bucket)
        return self._kv

    async def add(self, spec: EvalSpec, match: str = "*", include_current: bool = False) -> EvalTrigger:
        """Register; models served right now count as seen unless `include_current`."""
        seen = [] if include_current else sorted(self.client.models())
        trigger = EvalTrigger(
            trigger_id=f"t-{uuid.uuid4().hex[:8]}", spec=spec, match=match, seen=seen, created_at=time.time()
        )
        await (await self.kv()).put(trigger.trigger_id, msgspec.json.encode(trigger))
        return trigger

    async def remove(self, trigger_id: str) -> bool:
        kv = await self.kv()
        try:
            await kv.get(trigger_id)
        except Exception:
            return False
        await kv.delete(trigger_id)
        return True

    async def list(self) -> list[tuple[EvalTrigger, int]]:
        kv = await self.kv()
        out = [
            (msgspec.json.decode(e.value, type=EvalTrigger), e.revision or 0)
            for e in await bucket_entries(kv)
            if e.value
        ]
        return sorted(out, key=lambda p: p[0].created_at)

    async def claim(self, trigger: EvalTrigger, revision: int, model: str, job_id: str) -> bool:
        updated = msgspec.structs.replace(
            trigger, seen=[*trigger.seen, model], fired={**trigger.fired, model: job_id}
        )
        try:
            await (await self.kv()).update(trigger.trigger_id, msgspec.json.encode(updated), last=revision)
        except Exception:  # another worker claimed it first (wrong last revision)
            return False
        return True


def spec_for(trigger: EvalTrigger, model: str) -> EvalSpec:
    base = trigger.spec
    models = [model] if base.mode != "pairwise-all" else [*base.models, model]
    return msgspec.structs.replace(base, models=list(dict.fromkeys(models)), trigger=trigger.trigger_id)


class TriggerWatcher(Rounds):
    """Polls the served models and the triggers; submits one eval job per (trigger, new model)."""

    what = "eval triggers"

    def __init__(self, client: BusClient, jobs: Jobs, poll_s: float = 2.0) -> None:
        self.client = client
        self.jobs = jobs
        self.store = TriggerStore(client)
        super().__init__(poll_s)

    async def tick(self) -> list[str]:
        """One round; returns the submitted job ids."""
        submitted = []
        served = sorted(self.client.models())
        for trigger, revision in await self.store.list():
            skip = {trigger.spec.judge, trigger.spec.baseline, *trigger.seen}
            if trigger.spec.mode == "pairwise-all":
                skip |= set(trigger.spec.models)
            for model in served:
                if model in skip or not fnmatch.fnmatchcase(model, trigger.match):
                    continue
                job_id = f"eval-auto-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
                if not await self.store.claim(trigger, revision, model, job_id):
                    break  # the trigger changed under us: re-read it next round
                await self.jobs.submit(
                    "eval", spec_for(trigger, model), job_id=job_id, by=f"trigger {trigger.trigger_id}"
                )
                log.info("trigger %s: %s appeared, submitted %s", trigger.trigger_id, model, job_id)
                submitted.append(job_id)
                break  # one claim per trigger per round: the revision has moved on
        return submitted
