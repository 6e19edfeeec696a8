"""`chatbus train submit --serve --eval`: after training, wait until the result is served and judged.

Nodes started with `--serve-adapters` (on in `chatbus up`) load a finished train job's adapter by
themselves; when none did within a few seconds, the CLI asks the nodes of its base to load it over the
bus (`chatbus adapters load`). A judge worker's adapter watch (judge/loop.py) claims the evaluation in the
train job's record (`JobRecord.eval_job`) and writes the scores there (`JobRecord.scores`). This module
waits for each step, says what to start when one does not come, and ends with the base-vs-adapter table.
Interrupting it loses nothing: the jobs go on without it.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass
from typing import Any

import msgspec

from bus import AdapterCommand, BusClient, BusError, JobRecord, Jobs

__all__ = ["LoopOptions", "after_training", "score_table"]

# A node with --serve-adapters loads a new result within seconds of `done` (longer on a busy machine);
# asking it too early loads the adapter twice.
LOAD_GRACE_S = 15.0


@dataclass(frozen=True)
class LoopOptions:
    evaluate: bool = False
    serve_timeout_s: float = 300.0  # for the result to appear on the bus
    judge_timeout_s: float = 60.0  # for a judge worker to take up the evaluation


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _names(record: JobRecord) -> tuple[str, str]:
    result: Any = record.result if isinstance(record.result, dict) else {}
    name, base = str(result.get("name", "")), str(result.get("base_name", ""))
    return name, base or str(result.get("base", ""))


async def ask_to_load(client: BusClient, job_id: str, base: str) -> bool:
    """Ask the nodes that serve `base` to load the job's adapter (bus.schemas_adapters); True when one did."""
    nodes = [n.node_id for n in client.nodes() if any(c.name == base and not c.base for c in n.models)]
    for node_id in dict.fromkeys(nodes):
        try:
            reply = await client.adapters(node_id, AdapterCommand(action="load", ref=job_id))
        except BusError as e:
            _say(f"{node_id} did not load it: {e.message}")
            continue
        _say(f"{node_id}: {reply.message or 'loaded'}")
        return True
    return False


async def wait_served(client: BusClient, job_id: str, names: tuple[str, str], timeout_s: float) -> bool:
    """True once a node serves the job's result; asks the base's nodes to load it when none did by
    itself within LOAD_GRACE_S (nodes without --serve-adapters); says what to start while none can."""
    (name, base), deadline, hinted = names, time.monotonic() + timeout_s, ""
    base_since: float | None = None
    asked = False
    while name not in client.models():
        now = time.monotonic()
        if now > deadline:
            _say(
                f"error: {name} is not served after {timeout_s:.0f}s. Serve it: `chatbus adapters load {job_id}` "
                f"(or `chatbus node --adapter {job_id}`); then `chatbus eval follow {job_id}` shows its evaluation"
            )
            return False
        if base not in client.models():
            base_since = None
            hint = (
                f"waiting for a node to serve {name}: no node serves its base {base}; start one "
                f"(`chatbus up`, or `chatbus node --model BASE --serve-adapters`)"
            )
        else:
            base_since = base_since or now
            hint = f"waiting for a node of {base} to load {name}"
            if not asked and now - base_since >= LOAD_GRACE_S:
                asked = True  # once: a refusal says why, and asking again would say it again
                if not await ask_to_load(client, job_id, base):
                    hint = f"no node of {base} loads {name}: `chatbus node --adapter {job_id}` serves it"
        if hint != hinted:
            _say(hint)
            hinted = hint
        await asyncio.sleep(0.5)
    nodes = sorted(n.node_id for n in client.nodes() if any(c.name == name for c in n.models))
    _say(f"served: {name} on {', '.join(nodes) or 'the bus'}")
    return True


async def wait_claimed(
    client: BusClient, jobs: Jobs, job_id: str, names: tuple[str, str], timeout_s: float
) -> str | None:
    """The eval job a judge worker submitted for this train job's result; None (and why) if none came."""
    (name, base), deadline = names, time.monotonic() + timeout_s
    while True:
        record = await jobs.get(job_id)
        if record is not None and record.eval_job:
            return record.eval_job
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    if base not in client.models():  # a judge waits for both: it compares the two
        _say(
            f"error: {name} is judged against its base {base}, and no node serves {base}: start one "
            f"(`chatbus node`, with --model when it is not the default model); a judge takes it up then"
        )
    else:
        _say(
            f"error: no judge took up {name} within {timeout_s:.0f}s. Start a judge worker "
            f"(`python -m judge`, or `chatbus up --judge`): it evaluates {name} against its base while "
            f"both are served; then `chatbus eval follow {job_id}`"
        )
    return None


async def follow_eval(jobs: Jobs, eval_id: str) -> bool:
    """Print the eval's progress until it ends; True when it is done."""
    _say(f"evaluating: {eval_id}")
    tty, last = sys.stderr.isatty(), None
    async for event in jobs.events(eval_id):
        last = event
        if event.event == "progress" and event.message:
            line = f"eval: {event.message}"
            print(f"\r{line}\033[K" if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)
        elif event.event in ("started", "log", "failed", "cancelled") and event.message:
            _say(("\n" if tty else "") + f"eval {event.event}: {event.message}")
    if tty:
        print(file=sys.stderr)
    if last is None or last.state != "done":
        _say(
            f"error: eval {eval_id} {last.state if last else 'vanished'}; `chatbus eval status {eval_id}` says more"
        )
        return False
    return True


def score_table(name: str, base: str, scores: dict[str, float]) -> str:
    """The loop's last word: each model's mean judge rating (1-10), base first."""
    rows = [("base", base), ("adapter", name)]
    width = max(len("MODEL"), len(name), len(base))
    lines = [f"{'ROLE':<8} {'MODEL':<{width}} {'SCORE':>6}"]
    for role, model in rows:
        score = f"{scores[model]:.2f}" if model in scores else "-"
        lines.append(f"{role:<8} {model:<{width}} {score:>6}")
    if name in scores and base in scores:
        lines.append(f"{'delta':<8} {'':<{width}} {scores[name] - scores[base]:>+6.2f}")
    return "\n".join(lines)


async def after_training(jobs: Jobs, nats_url: str, job_id: str, opts: LoopOptions) -> int:
    """Wait for the finished job's result to be served (and with `evaluate`, judged); 0 when all came."""
    record = await jobs.get(job_id)
    assert record is not None and record.state == "done"
    name, base = _names(record)
    client = await BusClient.connect(nats_url, name="chatbus-train-loop")
    try:
        if not await wait_served(client, job_id, (name, base), opts.serve_timeout_s):
            return 1
        if not opts.evaluate:
            return 0
        eval_id = await wait_claimed(client, jobs, job_id, (name, base), opts.judge_timeout_s)
    finally:
        await client.close()
    if eval_id is None or not await follow_eval(jobs, eval_id):
        return 1
    record, judged = await jobs.get(job_id), await jobs.get(eval_id)
    scores = record.scores if record is not None else {}
    if judged is not None:  # the judge found the base by name on the bus: [adapter, base]
        base = (msgspec.json.decode(judged.spec).get("models") or [name, base])[-1]
    print(f"{name} against its base ({eval_id}; tables: chatbus eval results {job_id})")
    print(score_table(name, base, scores))
    return 0 if scores else 1
