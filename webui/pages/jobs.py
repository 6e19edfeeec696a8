"""The Jobs page: every train and eval job with its live state, and one job's page with cancel and results."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from nicegui import ui
from nicegui.events import GenericEventArguments

from bus import TERMINAL_STATES, BusError, JobRecord, redact
from webui.jobdata import spec_dict
from webui.pages.job_results import STATE_COLOR, EvalPanel, TrainPanel
from webui.services import Services

__all__ = ["job_page", "jobs_page"]

log = logging.getLogger(__name__)

SUBMIT_HINT = (
    "Submit one: `chatbus train submit --data chats.jsonl --follow` (fine-tuning) or "
    "`chatbus eval submit --models MODEL --judge JUDGE --follow` (an evaluation); it appears here at once."
)
COLUMNS: list[dict[str, Any]] = [
    {"name": "job_id", "label": "Job", "field": "job_id", "align": "left"},
    {"name": "kind", "label": "Kind", "field": "kind", "align": "left", "sortable": True},
    {"name": "state", "label": "State", "field": "state", "align": "left", "sortable": True},
    {"name": "progress", "label": "Progress", "field": "progress"},
    {"name": "message", "label": "Last message", "field": "message", "align": "left"},
    {"name": "submitted", "label": "Submitted", "field": "submitted", "align": "left"},
]


def ago(t: float) -> str:
    s = max(0, int(time.time() - t))
    return f"{s}s ago" if s < 60 else f"{s // 60}m ago" if s < 3600 else f"{s // 3600}h {s % 3600 // 60}m ago"


def _row(r: JobRecord) -> dict[str, Any]:
    return {
        "job_id": r.job_id,
        "kind": r.kind,
        "state": r.state,
        "progress": "" if r.progress is None else f"{100 * r.progress:.0f}%",
        "message": r.message[:120],
        "submitted": ago(r.submitted_at),
    }


def title(icon: str, text: str, subtitle: str) -> None:
    with ui.column().classes("gap-0"):
        with ui.row().classes("items-center gap-2"):
            ui.icon(icon, size="28px", color="primary")
            ui.label(text).classes("text-2xl font-semibold")
        ui.label(subtitle).classes("text-grey-6 text-sm")


def unavailable(services: Services) -> str:
    """Why no job can be shown, with what to do; empty when the job records are there."""
    if services.job_records is None:
        return (
            f"The job records could not be opened ({services.jobs_error}). Check that nats-server runs with "
            "JetStream at the app's --nats URL and that its credential may read jobs (`chatbus up` gives "
            "it one that may), then restart the web app."
        )
    return ""


def disconnected(services: Services) -> str:
    if services.client.connected:
        return ""
    return (
        f"The bus at {redact(services.config.nats)} is unreachable: what you see is the last known state. "
        "The app reconnects by itself once nats-server (or `chatbus up`) runs again."
    )


class JobsView:
    def __init__(self, services: Services) -> None:
        self.s = services
        self._shown = -1
        with ui.column().classes("w-full max-w-6xl mx-auto gap-4 px-2 pb-10"):
            with ui.row().classes("w-full items-end"):
                title("work_history", "Jobs", "Train and eval jobs on the bus, live. Click one for its page.")
                ui.space()
                self.summary = ui.label("").classes("text-grey-7").mark("jobs-summary")
            self.banner = ui.label("").classes("text-negative w-full").mark("jobs-banner")
            self.empty = ui.column().classes("w-full items-center py-16 gap-2").mark("no-jobs")
            with self.empty:
                ui.icon("inbox", size="48px", color="grey-5")
                ui.label("No jobs yet.").classes("text-grey-7 text-lg")
                ui.label(SUBMIT_HINT).classes("text-grey-6 text-center max-w-2xl")
            with ui.element("div").classes("cb-table-wrap") as self.wrap:
                self.table = (
                    ui.table(columns=COLUMNS, rows=[], row_key="job_id", pagination=25)
                    .props("flat bordered")
                    .classes("w-full rounded-2xl cursor-pointer")
                    .mark("jobs")
                )
            colors = json.dumps(STATE_COLOR).replace('"', "'")
            self.table.add_slot(
                "body-cell-state",
                f'<q-td :props="props"><q-badge :color="{colors}[props.value]" :label="props.value" /></q-td>',
            )
            self.table.on("rowClick", self._open)
        self.refresh()
        ui.timer(1.0, self.refresh)

    def _open(self, e: GenericEventArguments) -> None:
        row = e.args[1] if isinstance(e.args, list) and len(e.args) > 1 else {}
        if isinstance(row, dict) and row.get("job_id"):
            ui.navigate.to(f"/jobs/{row['job_id']}")

    def refresh(self) -> None:
        problem = unavailable(self.s) or disconnected(self.s)
        self.banner.set_text(problem)
        self.banner.visible = bool(problem)
        mirror = self.s.job_records
        records = mirror.records() if mirror is not None else []
        self.empty.visible = mirror is not None and not records
        self.wrap.visible = bool(records)
        version = mirror.version if mirror is not None else -1
        if version == self._shown and int(time.time()) % 10:  # "…s ago" moves on now and then
            return
        self._shown = version
        running = sum(r.state == "running" for r in records)
        self.summary.set_text(f"{len(records)} job{'s' * (len(records) != 1)} · {running} running")
        self.table.rows = [_row(r) for r in records]
        self.table.update()


class JobView:
    """One job: its state live, a Cancel button while it can be cancelled, and its kind's results."""

    def __init__(self, services: Services, job_id: str) -> None:
        self.s = services
        self.job_id = job_id
        self._shown: tuple[str, float] | None = None
        record = services.job_records.get(job_id) if services.job_records is not None else None
        with ui.column().classes("w-full max-w-6xl mx-auto gap-4 px-2 pb-10"):
            ui.link("← All jobs", "/jobs").classes("text-sm")
            self.banner = ui.label("").classes("text-negative w-full").mark("job-banner")
            if record is None:
                self.banner.set_text(unavailable(services) or f"No job {job_id!r} on this bus. {SUBMIT_HINT}")
                return
            with ui.row().classes("w-full items-center gap-3"):
                title("work" if record.kind == "train" else "fact_check", job_id, f"{record.kind} job")
                ui.space()
                self.state = ui.badge(record.state).classes("text-base px-3 py-1").mark("job-state")
                self.cancel_button = (
                    ui.button("Cancel job", icon="cancel", on_click=self._cancel)
                    .props("outline rounded color=negative no-caps")
                    .mark("job-cancel")
                )
            self.progress = ui.linear_progress(value=0, show_value=False, size="8px").props("rounded")
            self.message = ui.label("").classes("text-grey-7").mark("job-message")
            self.times = ui.label("").classes("text-xs text-grey-6")
            panel_class = TrainPanel if record.kind == "train" else EvalPanel
            self.panel = panel_class(services, job_id)
            with ui.expansion("Spec", icon="tune").classes("w-full").props("dense"):
                ui.code(json.dumps(spec_dict(record), indent=2), language="json").classes("w-full")
        self.refresh()
        ui.timer(1.0, self.refresh)

    def refresh(self) -> None:
        mirror = self.s.job_records
        record = mirror.get(self.job_id) if mirror is not None else None
        self.banner.set_text(disconnected(self.s))
        if record is None:
            return
        self.panel.record_changed(record, mirror.raw(self.job_id) if mirror is not None else {})
        if self._shown == (record.state, record.updated_at):
            return
        self._shown = (record.state, record.updated_at)
        self.state.set_text(record.state)
        self.state.props(f"color={STATE_COLOR.get(record.state, 'grey-7')}")
        self.cancel_button.visible = record.state not in TERMINAL_STATES
        self.progress.set_value(record.progress or (1.0 if record.state == "done" else 0.0))
        self.message.set_text(record.message)
        attempt = f" · attempt {record.attempt}" if record.attempt > 1 else ""
        self.times.set_text(
            f"submitted {ago(record.submitted_at)} · updated {ago(record.updated_at)}{attempt}"
        )

    async def _cancel(self) -> None:
        if self.s.jobs is None:
            ui.notify("The job records are not open: nothing can be cancelled.", type="negative")
            return
        self.cancel_button.disable()
        try:
            await asyncio.wait_for(self.s.jobs.cancel(self.job_id), 10)
        except (BusError, TimeoutError) as e:
            ui.notify(f"Could not cancel: {e}", type="negative")
            return
        finally:
            with contextlib.suppress(Exception):
                self.cancel_button.enable()
        ui.notify("Cancel sent: a queued job stops at once, a running one at its next safe point.")


def jobs_page(services: Services) -> None:
    JobsView(services)


def job_page(services: Services, job_id: str) -> None:
    JobView(services, job_id)
