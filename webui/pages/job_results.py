"""A job's results on its page: a train job's loss curve and checkpoints, an eval job's scores and verdicts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from typing import Any

from nicegui import ui

from bus import TERMINAL_STATES, BusError, JobRecord
from webui.jobdata import TrainView, category_scores, linked_evals, parse_jsonl, result_dict, verdict_rows
from webui.services import Services

__all__ = ["STATE_COLOR", "EvalPanel", "TrainPanel", "scores_chart"]

log = logging.getLogger(__name__)
STATE_COLOR = {"queued": "grey-7", "running": "primary", "done": "positive", "failed": "negative",
               "cancelled": "warning"}  # fmt: skip
PALETTE = ["#5b4ee6", "#26a69a", "#f59e0b", "#ef5350", "#42a5f5", "#ab47bc", "#8d6e63", "#78909c"]


class _Tasks(ui.element):
    """Holds a page's background tasks and cancels them when the page goes (navigation, tab closed)."""

    def __init__(self) -> None:
        super().__init__()
        self.tasks: list[asyncio.Task[Any]] = []

    def start(self, coro: Any) -> None:
        self.tasks.append(asyncio.create_task(coro))

    def _handle_delete(self) -> None:
        for task in self.tasks:
            task.cancel()
        super()._handle_delete()


def _stat(value: str, label: str, marker: str) -> ui.label:
    with ui.card().classes("rounded-2xl px-5 py-2 min-w-[120px]").props("flat bordered"):
        shown = ui.label(value).classes(f"text-xl font-semibold cb-{marker}").mark(marker)
        ui.label(label).classes("text-grey-6 text-xs")
    return shown


def loss_chart(points: dict[int, float]) -> dict[str, Any]:
    data = [[step, round(loss, 5)] for step, loss in sorted(points.items())]
    return {
        "tooltip": {"trigger": "axis"},
        "grid": {"left": 50, "right": 20, "top": 20, "bottom": 40},
        "xAxis": {"type": "value", "name": "step", "nameLocation": "middle", "nameGap": 25, "minInterval": 1,
                  "min": "dataMin"},
        "yAxis": {"type": "value", "name": "loss", "scale": True},
        "series": [{"type": "line", "name": "loss", "data": data, "showSymbol": len(data) < 60,
                    "itemStyle": {"color": PALETTE[0]}}],
    }  # fmt: skip


def scores_chart(scores: dict[str, dict[str, float]], *, pairwise: bool) -> dict[str, Any]:
    """Grouped bars: one group per category, one bar per model."""
    categories = sorted({c for by in scores.values() for c in by})
    return {
        "tooltip": {"trigger": "axis"},
        "legend": {"top": 0},
        "grid": {"left": 50, "right": 20, "top": 35, "bottom": 60},
        "xAxis": {"type": "category", "data": categories, "axisLabel": {"rotate": 20}},
        "yAxis": {"type": "value", "min": 0, "max": 100 if pairwise else 10,
                  "name": "adjusted win rate %" if pairwise else "score (1-10)"},
        "series": [{"type": "bar", "name": m, "itemStyle": {"color": PALETTE[i % len(PALETTE)]},
                    "data": [round(by[c], 2) if c in by else None for c in categories]}
                   for i, (m, by) in enumerate(sorted(scores.items()))],
    }  # fmt: skip


def _set(chart: ui.echart, options: dict[str, Any]) -> None:
    chart.options.clear()
    chart.options.update(options)
    chart.update()


class TrainPanel:
    """Follows the job's events (loss per step, checkpoints); when done, the whole per-step metrics file."""

    def __init__(self, services: Services, job_id: str) -> None:
        self.s = services
        self.job_id = job_id
        self.view = TrainView()
        self._dirty = False
        self._result: dict[str, Any] = {}
        self._links: list[tuple[str, dict[str, Any], tuple[str, Any]]] = []
        self._history_loaded = False
        self.tasks = _Tasks()
        with ui.row().classes("w-full gap-3"):
            self.steps = _stat("—", "steps", "train-steps")
            self.loss = _stat("—", "loss (first → last)", "train-loss")
            self.served = _stat("—", "serve it as", "train-name")
        with ui.card().classes("w-full rounded-2xl").props("flat bordered"):
            ui.label("Training loss").classes("font-medium")
            self.chart = ui.echart(loss_chart({})).classes("w-full h-72 cb-loss-chart").mark("loss-chart")
            self.no_loss = ui.label("No loss reported yet: the first step's loss appears here as it comes.")
            self.no_loss.classes("text-grey-6 text-sm")
        with ui.card().classes("w-full rounded-2xl").props("flat bordered"):
            ui.label("Checkpoints and artifacts").classes("font-medium")
            self.files = ui.column().classes("gap-1 text-sm").mark("train-files")
        self.evals = ui.column().classes("w-full gap-2").mark("train-evals")
        self.tasks.start(self._follow())
        ui.timer(1.0, self._redraw)

    async def _follow(self) -> None:
        if self.s.jobs is None:
            return
        try:
            async for event in self.s.jobs.events(self.job_id, follow=True):
                self.view.add(event)
                self._dirty = True
        except BusError as e:
            log.warning("job %s: events stopped (%s)", self.job_id, e)

    async def _load_history(self, name: str) -> None:
        if self.s.jobs is None:
            return
        with contextlib.suppress(BusError, asyncio.TimeoutError):
            data = await asyncio.wait_for(self.s.jobs.get_artifact(name), 10)
            self.view.add_history(parse_jsonl(data))
            self._dirty = True

    def record_changed(self, record: JobRecord, raw: dict[str, Any]) -> None:
        result = result_dict(record)
        if result != self._result:
            self._result = result
            self._dirty = True
            if record.state == "done" and result.get("metrics") and not self._history_loaded:
                self._history_loaded = True
                self.tasks.start(self._load_history(str(result["metrics"])))
        links = linked_evals(raw)
        key = [(label, value, self._linked_state(label)) for label, value in links]
        if key != self._links:
            self._links = key
            self._show_links()

    def _linked_state(self, label: str) -> tuple[str, Any]:
        """A linked eval job's state and result, so the section follows it until it is done."""
        mirror = self.s.job_records
        linked = mirror.get(label) if mirror is not None and label.startswith("eval-") else None
        return (linked.state, linked.result) if linked is not None else ("", None)

    def _redraw(self) -> None:
        if not self._dirty:
            return
        self._dirty = False
        points, r = self.view.loss, self._result
        self.no_loss.visible = not points
        _set(self.chart, loss_chart(points))
        if points:
            steps = sorted(points)
            self.steps.set_text(str(r.get("steps") or steps[-1]))
            self.loss.set_text(f"{points[steps[0]]:.3f} → {points[steps[-1]]:.3f}")
        if r.get("name"):
            self.served.set_text(str(r["name"]))
        self.files.clear()
        with self.files:
            for step, name, _at in self.view.checkpoints:
                ui.label(f"checkpoint at step {step}: {name}").mark("checkpoint")
            if r.get("artifact"):
                ui.label(f"model: {r['artifact']} ({r.get('method', '?')} on {r.get('base', '?')})")
            for key in ("config", "metrics"):
                if r.get(key):
                    ui.label(f"{key}: {r[key]}")
            if not self.view.checkpoints and not r.get("artifact"):
                ui.label("None yet: checkpoints are stored every `checkpoint_every` steps.").classes(
                    "text-grey-6"
                )

    def _show_links(self) -> None:
        """Eval results linked to this job (adapter vs base), shown as they are found in its record."""
        self.evals.clear()
        if not self._links:
            return
        with self.evals, ui.card().classes("w-full rounded-2xl").props("flat bordered"):
            ui.label("Evaluation of this model").classes("font-medium")
            for label, value, (state, result) in self._links:
                if label.startswith("eval-") and not value:
                    with ui.row().classes("items-center gap-2"):
                        ui.link(f"eval job {label}", f"/jobs/{label}").mark("linked-eval-job")
                        if state:
                            ui.badge(state, color=STATE_COLOR.get(state, "grey-7"))
                    value = result if isinstance(result, dict) else {}
                for kind in ("scores", "win_rates"):
                    if isinstance(value.get(kind), dict):
                        shown = " · ".join(f"{m} {v:.2f}" for m, v in value[kind].items()
                                           if isinstance(v, int | float) and math.isfinite(v))  # fmt: skip
                        ui.label(f"{label}: {kind.replace('_', ' ')} {shown}").mark("linked-eval")


VERDICT_COLUMNS: list[dict[str, Any]] = [
    {"name": "question", "label": "Question", "field": "question", "align": "left", "sortable": True},
    {"name": "category", "label": "Category", "field": "category", "align": "left", "sortable": True},
    {"name": "turn", "label": "Turn", "field": "turn"},
    {"name": "model", "label": "Model", "field": "model", "align": "left", "sortable": True},
    {"name": "verdict", "label": "Verdict", "field": "verdict", "align": "left", "sortable": True},
    {"name": "judgment", "label": "The judge said", "field": "judgment", "align": "left",
     "style": "white-space: normal; min-width: 320px"},
]  # fmt: skip


class EvalPanel:
    """The overall scores, per-category scores as a chart and every verdict, once the judgments are stored."""

    def __init__(self, services: Services, job_id: str) -> None:
        self.s = services
        self.job_id = job_id
        self._loaded: str = ""
        self._result: tuple[str, dict[str, Any]] | None = None
        self.tasks = _Tasks()
        self.overall = ui.row().classes("w-full gap-3").mark("eval-overall")
        with ui.card().classes("w-full rounded-2xl").props("flat bordered"):
            ui.label("Scores per category").classes("font-medium")
            self.chart = ui.echart(scores_chart({}, pairwise=False)).classes("w-full h-72 cb-scores-chart")
            self.chart.mark("scores-chart")
            self.waiting = ui.label("The scores appear when the judge has finished.").classes(
                "text-grey-6 text-sm"
            )
        with ui.element("div").classes("cb-table-wrap"):
            self.verdicts = (
                ui.table(columns=VERDICT_COLUMNS, rows=[], row_key="id", pagination=20)
                .props("flat bordered wrap-cells")
                .classes("w-full rounded-2xl")
                .mark("verdicts")
            )
        self.verdicts.visible = False

    def record_changed(self, record: JobRecord, raw: dict[str, Any]) -> None:
        result = result_dict(record)
        if (record.state, result) != self._result:
            self._result = (record.state, result)
            self._show_overall(record, result)
        name = str(result.get("judgments_artifact") or "")
        if record.state in TERMINAL_STATES and name and name != self._loaded:
            self._loaded = name
            self.tasks.start(self._load(name))

    def _show_overall(self, record: JobRecord, result: dict[str, Any]) -> None:
        self.overall.clear()
        with self.overall:
            for kind, label, fmt in (("scores", "score", "{:.2f}"), ("win_rates", "win rate", "{:.0%}")):
                values = result.get(kind)
                if isinstance(values, dict):
                    for model, value in values.items():
                        if isinstance(value, int | float) and math.isfinite(value):
                            _stat(fmt.format(value), f"{model} · {label}", "eval-score")
            if result:
                judged = f"{result.get('judged', 0)}/{result.get('judgments', 0)} judged"
                failures = result.get("failures") or {}
                if failures:
                    judged += " · not scored: " + ", ".join(f"{k} {v}" for k, v in failures.items())
                _stat(str(result.get("judge", "?")), f"judge · {judged}", "eval-judge")
        if record.state in ("failed", "cancelled"):
            self.waiting.set_text(f"The job {record.state}: {record.message}")

    async def _load(self, name: str) -> None:
        if self.s.jobs is None:
            return
        try:
            judgments = parse_jsonl(await asyncio.wait_for(self.s.jobs.get_artifact(name), 15))
        except (BusError, asyncio.TimeoutError) as e:
            self.waiting.set_text(f"The judgments could not be read ({e}).")
            return
        pairwise = any("model_1" in r for r in judgments)
        scores = category_scores(judgments)
        _set(self.chart, scores_chart(scores, pairwise=pairwise))
        self.waiting.set_text(
            f"{len(judgments)} judgments; "
            + ("adjusted win rate (ties count half)" if pairwise else "mean score")
        )
        self.verdicts.rows = verdict_rows(judgments)
        self.verdicts.visible = True
        self.verdicts.update()
