"""A node's metrics, measured in its bus adapter from the engine's deltas, put on the bus every METRICS_S.

What the deltas tell is enough for vLLM's per-request timings: acceptance, the first delta with a
token (time to first token), each later delta (inter-token latency, split evenly over the tokens it
carries), the last one (end-to-end and decode time). Queue and prefill times need the engine's
scheduler; they are observed only when a delta carries `queue_s` / `prefill_s` (both engines set them
on a request's first delta after prefill; llama.cpp's prefill is until its first token), and their
histograms stay empty otherwise. KV-cache use and prefix-cache queries/hits come from the engine's
EngineStats.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import time
from dataclasses import dataclass, field

from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from bus import subjects
from bus.codec import encode
from bus.operations import METRICS_S, open_metrics_bucket
from bus.schemas_metrics import HISTOGRAMS, Histogram, NodeMetrics
from node.engine import Delta, Engine

__all__ = ["MetricsRecorder"]

log = logging.getLogger(__name__)


class _Hist:
    def __init__(self, bounds: list[float]) -> None:
        self.bounds = bounds
        self.buckets = [0] * len(bounds)  # per bucket, made cumulative on snapshot
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float, times: int = 1) -> None:
        i = bisect.bisect_left(self.bounds, value)
        if i < len(self.buckets):
            self.buckets[i] += times
        self.count += times
        self.sum += value * times

    def wire(self) -> Histogram:
        cumulative, total = [], 0
        for n in self.buckets:
            total += n
            cumulative.append(total)
        return Histogram(bounds=self.bounds, counts=cumulative, count=self.count, sum=self.sum)


@dataclass
class _Timing:
    accepted: float
    trace_id: str = ""  # the client's X-Request-ID, for the log lines
    first: float = 0.0  # the first delta with a token
    last: float = 0.0
    tokens: int = 0  # completion tokens seen so far


@dataclass
class MetricsRecorder:
    """Counts what the node did; `run()` puts a snapshot in `cb_metrics` until cancelled."""

    engine: Engine
    node_id: str
    hists: dict[str, _Hist] = field(default_factory=lambda: {n: _Hist(b) for n, b in HISTOGRAMS.items()})
    prompt_tokens: int = 0
    generation_tokens: int = 0
    success: dict[str, int] = field(default_factory=dict)
    failure: dict[str, int] = field(default_factory=dict)
    _timings: dict[str, _Timing] = field(default_factory=dict)

    def accepted(self, request_id: str, trace_id: str = "") -> None:
        self._timings.setdefault(request_id, _Timing(time.monotonic(), trace_id))
        log.info("request %s accepted", request_id, extra={"request_id": trace_id or request_id})

    def delta(self, delta: Delta, failure_code: str | None = None) -> None:
        """One engine delta of an accepted request; `failure_code` when it ended as a failure."""
        timing = self._timings.get(delta.request_id)
        if timing is None:
            return
        now = time.monotonic()
        new = delta.completion_tokens - timing.tokens
        if new > 0:
            if not timing.tokens:
                timing.first = now
                self.hists["time_to_first_token_seconds"].observe(now - timing.accepted)
                if new > 1:  # tokens that came with the first one came no later than it
                    self.hists["inter_token_latency_seconds"].observe(0.0, new - 1)
            else:
                self.hists["inter_token_latency_seconds"].observe((now - timing.last) / new, new)
            timing.tokens, timing.last = delta.completion_tokens, now
        for name in ("queue_s", "prefill_s"):  # only from engines that measure them
            value = getattr(delta, name, None)
            if value is not None:
                hist = "request_queue_time_seconds" if name == "queue_s" else "request_prefill_time_seconds"
                self.hists[hist].observe(float(value))
        if delta.finish_reason is not None:
            self._finished(delta, timing, now, failure_code)

    def _finished(self, delta: Delta, timing: _Timing, now: float, failure_code: str | None) -> None:
        del self._timings[delta.request_id]
        log.info(
            "request %s finished: %s, %d + %d tokens in %.3fs",
            delta.request_id,
            failure_code or delta.finish_reason,
            delta.prompt_tokens,
            delta.completion_tokens,
            now - timing.accepted,
            extra={
                "request_id": timing.trace_id or delta.request_id,
                "finish_reason": failure_code or delta.finish_reason,
                "prompt_tokens": delta.prompt_tokens,
                "completion_tokens": delta.completion_tokens,
                "duration_s": round(now - timing.accepted, 4),
            },
        )
        self.prompt_tokens += delta.prompt_tokens
        self.generation_tokens += delta.completion_tokens
        if failure_code is not None:
            self.failure[failure_code] = self.failure.get(failure_code, 0) + 1
            return
        reason = str(delta.finish_reason)
        self.success[reason] = self.success.get(reason, 0) + 1
        self.hists["e2e_request_latency_seconds"].observe(now - timing.accepted)
        if timing.tokens:
            self.hists["request_decode_time_seconds"].observe(now - timing.first)

    def forget(self, request_id: str) -> None:
        """A request that was accepted but never reached the engine."""
        self._timings.pop(request_id, None)

    def snapshot(self) -> NodeMetrics:
        stats = self.engine.stats()
        return NodeMetrics(
            node_id=self.node_id,
            model=self.engine.card.name,
            device=self.engine.device,
            updated_at=time.time(),
            running=stats.running,
            waiting=stats.queued,
            kv_cache_usage=float(getattr(stats, "kv_cache_usage", 0.0)),
            tokens_per_s=round(stats.tokens_per_s, 2),
            prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generation_tokens,
            prefix_cache_queries=int(getattr(stats, "prefix_cache_queries", 0)),
            prefix_cache_hits=int(getattr(stats, "prefix_cache_hits", 0)),
            success=dict(self.success),
            failure=dict(self.failure),
            histograms={name: h.wire() for name, h in self.hists.items()},
        )

    async def run(self, js: JetStreamContext) -> None:
        kv: KeyValue | None = None
        key = subjects.metrics_key(self.node_id)
        while True:
            try:
                kv = kv or await open_metrics_bucket(js)
                await asyncio.wait_for(kv.put(key, encode(self.snapshot())), METRICS_S * 2)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a missing bucket or no leader for a moment: try again next time
                log.debug("cannot put metrics (%r)", e)
                kv = None
            await asyncio.sleep(METRICS_S)

    async def withdraw(self, js: JetStreamContext) -> None:
        with contextlib.suppress(Exception):
            await (await open_metrics_bucket(js)).delete(subjects.metrics_key(self.node_id))
