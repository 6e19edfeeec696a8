"""Wire messages of the metrics family: a node's cumulative counters and histograms, put in `cb_metrics`.

Every value is cumulative since the node started (counters, histogram bucket counts, sums), so any
gateway that reads the latest snapshot of each node serves exactly the union of the fleet; gauges are
the node's state at `updated_at`. Histogram `counts[i]` counts observations <= `bounds[i]`
(cumulative, as Prometheus has them); `count` includes those above the last bound (+Inf).
"""

from __future__ import annotations

import msgspec

from bus.schemas import _Tagged, _Wire

__all__ = ["HISTOGRAMS", "Histogram", "NodeMetrics"]

# vLLM's bucket bounds (vllm/v1/metrics/loggers.py), so boards built for vLLM chart these alike.
_LATENCY = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0]
HISTOGRAMS: dict[str, list[float]] = {
    "time_to_first_token_seconds": [
        *[0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75],
        *[1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0],
    ],
    "inter_token_latency_seconds": [
        *[0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75],
        *[1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0],
    ],
    "e2e_request_latency_seconds": _LATENCY,
    "request_queue_time_seconds": _LATENCY,
    "request_prefill_time_seconds": _LATENCY,
    "request_decode_time_seconds": _LATENCY,
}


class Histogram(_Wire, frozen=True, kw_only=True):
    bounds: list[float]
    counts: list[int]  # cumulative: observations <= bounds[i]
    count: int = 0
    sum: float = 0.0


class NodeMetrics(_Tagged, frozen=True, kw_only=True, tag="node.metrics"):
    """One node's metrics, re-put under its node id every METRICS_S (expires with the node)."""

    node_id: str
    model: str
    device: str = ""
    updated_at: float = 0.0
    # gauges
    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0  # 0..1, when the engine reports it
    tokens_per_s: float = 0.0
    # counters
    prompt_tokens: int = 0
    generation_tokens: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache (engine-reported)
    prefix_cache_hits: int = 0
    success: dict[str, int] = msgspec.field(default_factory=dict)  # finish reason -> requests
    failure: dict[str, int] = msgspec.field(default_factory=dict)  # errors.Code value -> requests
    histograms: dict[str, Histogram] = msgspec.field(default_factory=dict)  # HISTOGRAMS names
