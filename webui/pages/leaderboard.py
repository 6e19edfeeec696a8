"""The Leaderboard: Elo and Bradley–Terry ratings with bootstrap intervals from the vote log; judge scores."""

from __future__ import annotations

from typing import Any

from nicegui import run, ui
from nicegui.events import ValueChangeEventArguments

from webui.logstore import DEDUPE_KEEP
from webui.pages.judge_board import JudgeTab
from webui.ratings import PROVISIONAL_BATTLES, Rating, battle_counts, leaderboard, win_rate_matrix
from webui.services import Services

__all__ = ["leaderboard_page"]

COLUMNS: list[dict[str, Any]] = [
    {"name": "rank", "label": "Rank", "field": "rank", "align": "left"},
    {"name": "model", "label": "Model", "field": "model", "align": "left", "sortable": True},
    {"name": "bt", "label": "Rating (BT)", "field": "bt", "sortable": True},
    {"name": "ci", "label": "95% CI", "field": "ci"},
    {"name": "elo", "label": "Online Elo", "field": "elo", "sortable": True},
    {"name": "battles", "label": "Battles", "field": "battles", "sortable": True},
    {"name": "record", "label": "W / T / L", "field": "record"},
    {"name": "win_rate", "label": "Win rate", "field": "win_rate", "sortable": True},
]


def _ci(r: Rating) -> str:
    """The interval as +up / -down; none yet while every resample agrees (one battle, say)."""
    if r.bt_ci[1] - r.bt_ci[0] < 1:
        return "— (too few battles)"
    return f"+{r.bt_ci[1] - r.bt:.0f} / -{r.bt - r.bt_ci[0]:.0f}"


def _rows(board: list[Rating]) -> list[dict[str, Any]]:
    return [
        {
            "rank": f"{r.rank} (provisional)" if r.provisional else str(r.rank),
            "model": r.model,
            "bt": round(r.bt),
            "ci": _ci(r),
            "elo": round(r.elo),
            "battles": r.battles,
            "record": f"{r.wins} / {r.ties} / {r.losses}",
            "win_rate": f"{100 * r.win_rate:.0f}%",
        }
        for r in board
    ]


def _ci_chart(board: list[Rating]) -> dict[str, Any]:
    """Ratings as dots with their interval as a floating bar (a stacked bar: transparent base + span)."""
    rows = board[::-1]  # best on top
    low = min((r.bt_ci[0] for r in board), default=900.0) - 25
    high = max((r.bt_ci[1] for r in board), default=1100.0) + 25
    return {
        "tooltip": {"trigger": "item"},
        "grid": {"left": 120, "right": 30, "top": 10, "bottom": 30},
        "yAxis": {"type": "category", "data": [r.model for r in rows]},
        "xAxis": {"type": "value", "min": round(low), "max": round(high)},
        "series": [
            {"type": "bar", "stack": "ci", "silent": True, "itemStyle": {"color": "transparent"}, "data": [round(r.bt_ci[0], 1) for r in rows]},
            {"type": "bar", "stack": "ci", "name": "95% CI", "barWidth": 10, "itemStyle": {"color": "#c9c3ff", "borderRadius": 5}, "data": [round(r.bt_ci[1] - r.bt_ci[0], 1) for r in rows]},
            {"type": "scatter", "name": "Rating", "symbolSize": 13, "itemStyle": {"color": "#5b4ee6"}, "data": [[round(r.bt, 1), r.model] for r in rows], "label": {"show": True, "position": "top", "formatter": "{@[0]}"}},
        ],
    }  # fmt: skip


def _heatmap(models: list[str], values: dict[str, dict[str, float]], *, percent: bool) -> dict[str, Any]:
    data = [
        [j, i, round(100 * values[a][b]) if percent else values[a][b]]
        for i, a in enumerate(models)
        for j, b in enumerate(models)
        if b in values.get(a, {})
    ]
    return {
        "tooltip": {"position": "top"},
        "grid": {"left": 110, "right": 20, "top": 10, "bottom": 70},
        "xAxis": {"type": "category", "data": models, "name": "opponent", "axisLabel": {"rotate": 30}},
        "yAxis": {"type": "category", "data": models, "inverse": True},  # best on top, as in the table
        "visualMap": {"min": 0, "max": 100 if percent else max([d[2] for d in data], default=1), "show": False,
                      "inRange": {"color": ["#fde2e2", "#f7f7ff", "#5b4ee6"] if percent else ["#f7f7ff", "#5b4ee6"]}},
        "series": [{"type": "heatmap", "data": data, "label": {"show": True, "formatter": "{@[2]}%" if percent else "{@[2]}"}}],
    }  # fmt: skip


class LeaderboardView:
    def __init__(self, services: Services) -> None:
        self.s = services
        self.include_named = False
        self.style = False
        self._shown: tuple[int, bool, bool] = (-1, False, False)
        self._board: list[Rating] = []
        self._board_version = 0
        with ui.column().classes("w-full max-w-6xl mx-auto gap-5 px-2 pb-10"):
            with ui.row().classes("w-full items-end"):
                with ui.column().classes("gap-0"):
                    with ui.row().classes("items-center gap-2"):
                        ui.icon("emoji_events", size="28px", color="accent")
                        ui.label("Leaderboard").classes("text-2xl font-semibold")
                    ui.label(
                        "Bradley–Terry (maximum likelihood) with 95% bootstrap intervals and online Elo, "
                        "from the arena votes in the log. Ranks come from the intervals: models whose "
                        "intervals overlap share a rank; fewer than "
                        f"{PROVISIONAL_BATTLES} battles is provisional. Battles whose answers named a model, "
                        f"and repeats of a prompt beyond {DEDUPE_KEEP}, are left out."
                    ).classes("text-grey-6 text-sm")
                ui.space()
                with ui.column().classes("gap-0"):
                    ui.switch("Include named side-by-side votes", on_change=self._toggle).mark(
                        "include-named"
                    )
                    ui.switch("Control for answer length", on_change=self._toggle_style).mark("style-control")
            with ui.tabs().props("no-caps align=left").classes("w-full") as tabs:
                arena_tab = ui.tab("arena", "Arena ratings", icon="sports_mma").mark("tab-arena")
                ui.tab("judge", "Judge scores", icon="fact_check").mark("tab-judge")
            with ui.tab_panels(tabs, value=arena_tab).classes("w-full bg-transparent"):
                with ui.tab_panel("arena").classes("px-0 flex flex-col gap-5"):
                    self._arena_panel()
                with ui.tab_panel("judge").classes("px-0"):
                    self.judge = JudgeTab(services)
        self.content.visible = False  # until there is something to show: one "no battles" state
        ui.timer(1.0, self.refresh)

    def _arena_panel(self) -> None:
        """The first tab: the ratings table and its charts, or one "no battles" state."""
        with ui.row().classes("w-full gap-4 cb-stats-row"):
            self.stats = [self._stat(label) for label in ("Models", "Rated battles", "Votes in the log")]
        self.empty = (
            ui.label("No battles yet — vote in the Arena and the ratings appear here.")
            .classes("text-grey-6 text-lg w-full text-center py-10")
            .mark("no-battles")
        )
        with ui.column().classes("w-full gap-5") as self.content:
            with ui.element("div").classes("cb-table-wrap"):
                self.table = (
                    ui.table(columns=COLUMNS, rows=[], row_key="model")
                    .props("flat bordered")
                    .classes("w-full rounded-2xl")
                    .mark("ratings")
                )
            with ui.row().classes("cb-split w-full gap-4 no-wrap"):
                with ui.card().classes("w-1/2 rounded-2xl").props("flat bordered"):
                    ui.label("Ratings with 95% confidence intervals").classes("font-medium")
                    self.ci_chart = ui.echart(_ci_chart([])).classes("w-full h-72")
                with ui.card().classes("w-1/2 rounded-2xl").props("flat bordered"):
                    ui.label("Win rate of row over column (decisive battles)").classes("font-medium")
                    self.win_chart = ui.echart(_heatmap([], {}, percent=True)).classes("w-full h-72")
            with ui.card().classes("w-full rounded-2xl").props("flat bordered"):
                ui.label("Battles per pair").classes("font-medium")
                self.count_chart = ui.echart(_heatmap([], {}, percent=False)).classes("w-full h-64")

    @staticmethod
    def _stat(label: str) -> ui.label:
        with ui.card().classes("rounded-2xl px-6 py-3 min-w-[160px]").props("flat bordered"):
            key = label.split()[0].lower()
            value = ui.label("0").classes(f"text-2xl font-semibold cb-stat-{key}").mark(f"stat-{key}")
            ui.label(label).classes("text-grey-6 text-sm")
        return value

    def _toggle(self, e: ValueChangeEventArguments) -> None:
        self.include_named = bool(e.value)

    def _toggle_style(self, e: ValueChangeEventArguments) -> None:
        self.style = bool(e.value)

    async def refresh(self) -> None:
        self.judge.refresh(self._board, self._board_version)
        key = (self.s.logs.version, self.include_named, self.style)
        if key == self._shown:
            return
        self._shown = key
        battles = self.s.logs.battles(include_named=self.include_named)
        rounds = 50 if self.style else 200  # the length-controlled fit is slower
        board = await run.io_bound(leaderboard, battles, rounds=rounds, style=self.style)
        if board is None:
            return
        self._board, self._board_version = board, self._board_version + 1
        models = [r.model for r in board]
        self.stats[0].set_text(str(len(models)))
        self.stats[1].set_text(str(len(battles)))
        self.stats[2].set_text(str(len(self.s.logs.votes())))
        self.empty.visible = not board
        self.content.visible = bool(board)
        self.table.rows = _rows(board)
        self.table.update()
        self.ci_chart.options.clear()
        self.ci_chart.options.update(_ci_chart(board))
        self.win_chart.options.clear()
        self.win_chart.options.update(_heatmap(models, win_rate_matrix(battles), percent=True))
        counts = battle_counts(battles)
        self.count_chart.options.clear()
        self.count_chart.options.update(
            _heatmap(
                models, {a: {b: float(n) for b, n in row.items()} for a, row in counts.items()}, percent=False
            )
        )
        for chart in (self.ci_chart, self.win_chart, self.count_chart):
            chart.update()


def leaderboard_page(services: Services) -> None:
    LeaderboardView(services)
