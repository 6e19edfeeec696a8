"""The Nodes page: every live node with its models, device, load and speed, and charts of the last minutes."""

from __future__ import annotations

import time
from typing import Any

from nicegui import ui

from bus import NodeInfo
from webui.nodehistory import Sample
from webui.services import Services

__all__ = ["nodes_page"]


def _uptime(started_at: float) -> str:
    s = max(0, int(time.time() - started_at)) if started_at else 0
    return f"{s // 3600}h {s % 3600 // 60}m" if s >= 3600 else f"{s // 60}m {s % 60}s"


def _snapshot(nodes: list[NodeInfo]) -> tuple:
    return tuple(
        (n.node_id, n.capacity, n.device, n.dtype, tuple(m.name for m in n.models))
        for n in sorted(nodes, key=lambda n: n.node_id)
    )


def series_chart(samples: list[Sample]) -> dict[str, Any]:
    """tok/s (left axis) and running / queued (right axis) over the last minutes."""
    t = [time.strftime("%H:%M:%S", time.localtime(x.at)) for x in samples]
    return {
        "animation": False,
        "tooltip": {"trigger": "axis"},
        "legend": {"top": 0, "textStyle": {"fontSize": 10}, "itemWidth": 12, "itemHeight": 8},
        "grid": {"left": 34, "right": 26, "top": 24, "bottom": 20},
        "xAxis": {"type": "category", "data": t, "axisLabel": {"fontSize": 9}},
        "yAxis": [{"type": "value", "min": 0, "axisLabel": {"fontSize": 9}},
                  {"type": "value", "min": 0, "minInterval": 1, "axisLabel": {"fontSize": 9},
                   "splitLine": {"show": False}}],
        "series": [
            {"type": "line", "name": "tok/s", "data": [x.tokens_per_s for x in samples], "showSymbol": False,
             "areaStyle": {"opacity": 0.15}, "itemStyle": {"color": "#5b4ee6"}},
            {"type": "line", "name": "running", "yAxisIndex": 1, "step": "end", "showSymbol": False,
             "data": [x.running for x in samples], "itemStyle": {"color": "#26a69a"}},
            {"type": "line", "name": "queued", "yAxisIndex": 1, "step": "end", "showSymbol": False,
             "data": [x.queued for x in samples], "itemStyle": {"color": "#f59e0b"}},
        ],
    }  # fmt: skip


class NodeCard:
    """One node's card; `update` changes its numbers and chart in place (no flicker as it beats)."""

    def __init__(self, n: NodeInfo) -> None:
        with ui.card().classes("rounded-2xl w-[340px]").props("flat bordered").mark(f"node-{n.node_id}"):
            with ui.row().classes("w-full items-center no-wrap gap-2"):
                ui.icon("memory" if n.device == "cpu" else "developer_board", size="26px", color="primary")
                with ui.column().classes("gap-0 min-w-0"):
                    ui.label(n.node_id).classes("font-semibold truncate cb-node-id")
                    self.where = ui.label("").classes("text-xs text-grey-6")
                ui.space()
                ui.badge(n.device.upper(), color="secondary")
            with ui.row().classes("gap-1"):
                for m in n.models:
                    ui.chip(m.name, icon="smart_toy").props("dense outline color=primary").classes("text-xs")
            with ui.row().classes("w-full items-end no-wrap gap-4"):
                with ui.column().classes("gap-0"):
                    self.speed = ui.label("").classes("text-2xl font-semibold")
                    ui.label("tokens/s").classes("text-xs text-grey-6")
                with ui.column().classes("gap-1 grow"):
                    self.load = ui.label("").classes("text-xs text-grey-7")
                    self.bar = ui.linear_progress(value=0, show_value=False, size="8px").props("rounded")
            self.chart = ui.echart(series_chart([])).classes("w-full h-36 cb-node-chart")
            ui.label(
                f"dtype {n.dtype} · context {', '.join(str(m.context_length) for m in n.models)}"
            ).classes("text-xs text-grey-6")
        self._points = -1.0

    def update(self, n: NodeInfo, samples: list[Sample]) -> None:
        self.where.set_text(f"{n.host} · pid {n.pid} · up {_uptime(n.started_at)}")
        self.speed.set_text(f"{n.tokens_per_s:.1f}")
        self.load.set_text(f"load {n.running} running · {n.queued} queued / {n.capacity}")
        self.bar.set_value(min(1.0, n.load))
        self.bar.props(f"color={'negative' if n.load >= 1 else 'primary'}")
        last = samples[-1].at if samples else 0.0
        if last != self._points:
            self._points = last
            self.chart.options.clear()
            self.chart.options.update(series_chart(samples))
            self.chart.update()


class NodesView:
    def __init__(self, services: Services) -> None:
        self.s = services
        self._shown: tuple | None = None
        self.cards: dict[str, NodeCard] = {}
        with ui.column().classes("w-full max-w-6xl mx-auto gap-4 px-2 pb-10"):
            with ui.row().classes("w-full items-end"):
                with ui.column().classes("gap-0"):
                    with ui.row().classes("items-center gap-2"):
                        ui.icon("hub", size="28px", color="primary")
                        ui.label("Nodes").classes("text-2xl font-semibold")
                    ui.label(
                        "Every node heartbeating on the bus, live; the charts hold the last "
                        f"{services.history.window_s / 60:.0f} minutes this app has seen."
                    ).classes("text-grey-6 text-sm")
                ui.space()
                self.summary = ui.label("").classes("text-grey-7").mark("nodes-summary")
            self.grid = ui.row().classes("w-full gap-4").mark("nodes")
        self.refresh()
        ui.timer(1.0, self.refresh)

    def refresh(self) -> None:
        nodes = sorted(self.s.client.nodes(), key=lambda n: n.node_id)
        snap = _snapshot(nodes)
        if snap != self._shown:  # the set of nodes (or their models) changed: lay the cards out again
            self._shown = snap
            models = {m.name for n in nodes for m in n.models}
            self.summary.set_text(
                f"{len(nodes)} node{'s' * (len(nodes) != 1)} · {len(models)} model{'s' * (len(models) != 1)}"
            )
            self.grid.clear()
            self.cards = {}
            with self.grid:
                if not nodes:
                    with ui.column().classes("w-full items-center py-16 gap-2"):
                        ui.icon("cloud_off", size="48px", color="grey-5")
                        ui.label(
                            "No nodes online. Start one with `chatbus up` or `python -m node --nats URL`."
                        ).classes("text-grey-6")
                for n in nodes:
                    self.cards[n.node_id] = NodeCard(n)
        for n in nodes:
            self.cards[n.node_id].update(n, self.s.history.series(n.node_id))


def nodes_page(services: Services) -> None:
    NodesView(services)
