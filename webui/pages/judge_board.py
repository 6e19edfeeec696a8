"""The leaderboard's second tab: each model's latest judge score (from finished eval jobs) beside its arena rating."""

from __future__ import annotations

import time
from typing import Any

from nicegui import ui

from webui.jobdata import judge_board
from webui.ratings import Rating
from webui.services import Services

__all__ = ["JudgeTab"]

COLUMNS: list[dict[str, Any]] = [
    {"name": "model", "label": "Model", "field": "model", "align": "left", "sortable": True},
    {"name": "judge_score", "label": "Judge score", "field": "judge_score", "sortable": True},
    {"name": "arena", "label": "Arena rating (BT)", "field": "arena", "sortable": True},
    {"name": "battles", "label": "Arena battles", "field": "battles", "sortable": True},
    {"name": "judge", "label": "Judge", "field": "judge", "align": "left"},
    {"name": "questions", "label": "Questions", "field": "questions"},
    {"name": "job", "label": "Eval job", "field": "job", "align": "left"},
    {"name": "when", "label": "Judged", "field": "when", "align": "left"},
]
EMPTY = (
    "No judge scores yet. Evaluate a model with `chatbus eval submit --models MODEL --judge JUDGE --follow`: "
    "when the job is done its scores appear here, beside the arena ratings."
)


def _rows(services: Services, arena: list[Rating]) -> list[dict[str, Any]]:
    records = services.job_records.records() if services.job_records is not None else []
    board = judge_board(records)
    ratings = {r.model: r for r in arena}
    rows = []
    for model, j in sorted(board.items(), key=lambda kv: -kv[1]["value"]):
        r = ratings.get(model)
        score = f"{j['value']:.2f} / 10" if j["kind"] == "score" else f"{100 * j['value']:.0f}% win rate"
        rows.append(
            {
                "model": model,
                "judge_score": score,
                "arena": round(r.bt) if r else "—",
                "battles": r.battles if r else 0,
                "judge": j["judge"],
                "questions": j["questions"],
                "job": j["job_id"],
                "when": time.strftime("%Y-%m-%d %H:%M", time.localtime(j["at"])),
            }
        )
    return rows


class JudgeTab:
    """Refreshed when the job records or the arena board change."""

    def __init__(self, services: Services) -> None:
        self.s = services
        self._shown: tuple[int, int] = (-1, -1)
        if services.job_records is None:
            ui.label(f"The job records could not be opened ({services.jobs_error}).").classes("text-negative")
        self.empty = ui.label(EMPTY).classes("text-grey-6 text-lg w-full text-center py-10").mark("no-judge")
        with ui.element("div").classes("cb-table-wrap") as self.wrap:
            self.table = (
                ui.table(columns=COLUMNS, rows=[], row_key="model")
                .props("flat bordered")
                .classes("w-full rounded-2xl cb-judge-scores")
                .mark("judge-scores")
            )
        self.wrap.visible = False

    def refresh(self, arena: list[Rating], arena_version: int) -> None:
        version = self.s.job_records.version if self.s.job_records is not None else -1
        if (version, arena_version) == self._shown:
            return
        self._shown = (version, arena_version)
        rows = _rows(self.s, arena)
        self.empty.visible = not rows
        self.wrap.visible = bool(rows)
        self.table.rows = rows
        self.table.update()
