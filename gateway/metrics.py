"""Prometheus metrics of the whole bus on any gateway: the nodes' snapshots from `cb_metrics`, the
fleet from the node table, and this gateway's own HTTP counters, in one registry per app.

Names follow vLLM's (`vllm:` → `chatbus:`), labelled by model_name and node, so boards built for vLLM
port with a rename. Node values are cumulative since the node started, so every gateway serves the
same numbers; scrape one gateway (or dedupe with `max by (node, ...)`) for fleet-wide charts.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bus import BusClient, MetricsView, NodeMetrics

__all__ = ["BusCollector", "GatewayMetrics", "HttpMetrics", "metrics"]

P = "chatbus:"


class BusCollector(Collector):
    """Yields the nodes' metrics and the fleet at scrape time."""

    def __init__(self, view: MetricsView, client: BusClient) -> None:
        self._view = view
        self._client = client

    def collect(self) -> Iterator[Metric]:
        nodes = self._view.nodes()
        labels = ["model_name", "node"]

        def family(kind: Any, name: str, doc: str, extra: list[str] | None = None) -> Any:
            return kind(P + name, doc, labels=labels + (extra or []))

        gauges = {
            "num_requests_running": ("Requests decoding on the node", lambda m: m.running),
            "num_requests_waiting": ("Requests waiting for a slot", lambda m: m.waiting),
            "kv_cache_usage_perc": ("KV-cache use, 0 to 1 (engine-reported)", lambda m: m.kv_cache_usage),
            "generation_tokens_per_second": ("Recent decode throughput", lambda m: m.tokens_per_s),
        }
        for name, (doc, get) in gauges.items():
            g = family(GaugeMetricFamily, name, doc)
            for m in nodes:
                g.add_metric([m.model, m.node_id], get(m))
            yield g
        counters = {
            "prompt_tokens": ("Prompt tokens processed", lambda m: m.prompt_tokens),
            "generation_tokens": ("Tokens generated", lambda m: m.generation_tokens),
            "prefix_cache_queries": (
                "Prompt tokens looked up in the prefix cache",
                lambda m: m.prefix_cache_queries,
            ),
            "prefix_cache_hits": ("Prompt tokens found in the prefix cache", lambda m: m.prefix_cache_hits),
        }
        for name, (doc, get) in counters.items():
            c = family(CounterMetricFamily, name, doc)
            for m in nodes:
                c.add_metric([m.model, m.node_id], get(m))
            yield c
        success = family(
            CounterMetricFamily, "request_success", "Requests finished, by reason", ["finished_reason"]
        )
        failure = family(CounterMetricFamily, "request_failure", "Requests failed, by error code", ["code"])
        for m in nodes:
            for reason, n in sorted(m.success.items()):
                success.add_metric([m.model, m.node_id, reason], n)
            for code, n in sorted(m.failure.items()):
                failure.add_metric([m.model, m.node_id, code], n)
        yield success
        yield failure
        yield from self._histograms(nodes, labels)
        yield self._fleet()

    def _histograms(self, nodes: list[NodeMetrics], labels: list[str]) -> Iterator[Metric]:
        names = sorted({name for m in nodes for name in m.histograms})
        for name in names:
            h = HistogramMetricFamily(P + name, f"{name.replace('_', ' ')} (from the nodes)", labels=labels)
            for m in nodes:
                hist = m.histograms.get(name)
                if hist is None:
                    continue
                buckets = [(floatToGoString(b), c) for b, c in zip(hist.bounds, hist.counts, strict=True)]
                buckets.append(("+Inf", hist.count))
                h.add_metric([m.model, m.node_id], buckets, hist.sum)
            yield h

    def _fleet(self) -> Metric:
        g = GaugeMetricFamily(
            P + "nodes_up", "Live nodes per model and device", labels=["model_name", "device"]
        )
        up: dict[tuple[str, str], int] = {}
        for node in self._client.nodes():
            for card in node.models:
                up[(card.name, node.device)] = up.get((card.name, node.device), 0) + 1
        for (model, device), n in sorted(up.items()):
            g.add_metric([model, device], n)
        return g


class GatewayMetrics:
    """This gateway's own metrics, in a registry of its own (two gateways in one process stay apart)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.http = Counter(
            P + "http_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.streams = Gauge(P + "gateway_active_streams", "SSE answers streaming now", registry=r)
        self.resumes = Counter(P + "gateway_resumes", "Streams resumed with Last-Event-ID", registry=r)
        self.failovers = Counter(P + "gateway_failovers", "Answers moved to another node mid-way", registry=r)
        self.limited = Counter(
            P + "gateway_rate_limited", "Requests refused by a key's limits", ["key", "reason"], registry=r
        )


class HttpMetrics:
    """Counts each HTTP request by route template (unmatched paths: 'other') and status."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.http.labels(_route_of(scope), str(status)).inc()


def _route_of(scope: Scope) -> str:
    """The route template the router matched, or would have (a request refused before routing)."""
    route = scope.get("route")
    if route is None:
        for candidate in getattr(scope.get("app"), "routes", []):
            if candidate.matches(scope)[0] != Match.NONE:
                route = candidate
                break
    return getattr(route, "path", None) or "other"


async def metrics(request: Request) -> Response:
    """GET /metrics: the Prometheus text format of this gateway's registry (bus-wide once started)."""
    ops = request.app.state.ops
    await ops.ready()
    return Response(generate_latest(ops.metrics.registry), media_type=CONTENT_TYPE_LATEST)
