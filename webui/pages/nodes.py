"""The Nodes page: every live node with its models, device, load and speed, updating live."""

from __future__ import annotations

import time

from nicegui import ui

from bus import NodeInfo
from webui.services import Services

__all__ = ["nodes_page"]


def _uptime(started_at: float) -> str:
    s = max(0, int(time.time() - started_at)) if started_at else 0
    return f"{s // 3600}h {s % 3600 // 60}m" if s >= 3600 else f"{s // 60}m {s % 60}s"


def _snapshot(nodes: list[NodeInfo]) -> tuple:
    return tuple(
        (n.node_id, n.running, n.queued, round(n.tokens_per_s), n.capacity, tuple(m.name for m in n.models))
        for n in sorted(nodes, key=lambda n: n.node_id)
    )


def _node_card(n: NodeInfo) -> None:
    with ui.card().classes("rounded-2xl w-[340px]").props("flat bordered").mark(f"node-{n.node_id}"):
        with ui.row().classes("w-full items-center no-wrap gap-2"):
            ui.icon("memory" if n.device == "cpu" else "developer_board", size="26px", color="primary")
            with ui.column().classes("gap-0 min-w-0"):
                ui.label(n.node_id).classes("font-semibold truncate cb-node-id")
                ui.label(f"{n.host} · pid {n.pid} · up {_uptime(n.started_at)}").classes(
                    "text-xs text-grey-6"
                )
            ui.space()
            ui.badge(n.device.upper(), color="secondary")
        with ui.row().classes("gap-1"):
            for m in n.models:
                ui.chip(m.name, icon="smart_toy").props("dense outline color=primary").classes("text-xs")
        with ui.row().classes("w-full items-end no-wrap gap-4"):
            with ui.column().classes("gap-0"):
                ui.label(f"{n.tokens_per_s:.1f}").classes("text-2xl font-semibold")
                ui.label("tokens/s").classes("text-xs text-grey-6")
            with ui.column().classes("gap-1 grow"):
                ui.label(f"load {n.running} running · {n.queued} queued / {n.capacity}").classes(
                    "text-xs text-grey-7"
                )
                ui.linear_progress(value=min(1.0, n.load), show_value=False, size="8px").props(
                    f"rounded color={'negative' if n.load >= 1 else 'primary'}"
                )
        ui.label(f"dtype {n.dtype} · context {', '.join(str(m.context_length) for m in n.models)}").classes(
            "text-xs text-grey-6"
        )


class NodesView:
    def __init__(self, services: Services) -> None:
        self.s = services
        self._shown: tuple | None = None
        with ui.column().classes("w-full max-w-6xl mx-auto gap-4 px-2 pb-10"):
            with ui.row().classes("w-full items-end"):
                with ui.column().classes("gap-0"):
                    with ui.row().classes("items-center gap-2"):
                        ui.icon("hub", size="28px", color="primary")
                        ui.label("Nodes").classes("text-2xl font-semibold")
                    ui.label("Every node heartbeating on the bus, live.").classes("text-grey-6 text-sm")
                ui.space()
                self.summary = ui.label("").classes("text-grey-7").mark("nodes-summary")
            self.grid = ui.row().classes("w-full gap-4").mark("nodes")
        self.refresh()
        ui.timer(1.0, self.refresh)

    def refresh(self) -> None:
        nodes = self.s.client.nodes()
        snap = _snapshot(nodes)
        if snap == self._shown:
            return
        self._shown = snap
        models = {m.name for n in nodes for m in n.models}
        self.summary.set_text(
            f"{len(nodes)} node{'s' * (len(nodes) != 1)} · {len(models)} model{'s' * (len(models) != 1)}"
        )
        self.grid.clear()
        with self.grid:
            if not nodes:
                with ui.column().classes("w-full items-center py-16 gap-2"):
                    ui.icon("cloud_off", size="48px", color="grey-5")
                    ui.label(
                        "No nodes online. Start one with `chatbus up` or `python -m node --nats URL`."
                    ).classes("text-grey-6")
            for n in sorted(nodes, key=lambda n: n.node_id):
                _node_card(n)


def nodes_page(services: Services) -> None:
    NodesView(services)
