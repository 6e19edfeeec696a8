"""The Usage page (admins only): each API key's limits, expiry and requests and tokens, per day and model."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import MutableMapping
from typing import Any

import msgspec
from nicegui import ui

from webui.pages.jobs import title
from webui.services import Services
from webui.usage import UsageReport, admin_mark, key_rows, token_matches

__all__ = ["usage_page"]

KEY_COLUMNS: list[dict[str, Any]] = [
    {"name": "name", "label": "Key", "field": "name", "align": "left", "sortable": True},
    {"name": "state", "label": "State", "field": "state", "align": "left", "sortable": True},
    {"name": "requests", "label": "Requests", "field": "requests", "sortable": True},
    {"name": "today", "label": "Today", "field": "today", "sortable": True},
    {"name": "prompt", "label": "Prompt tokens", "field": "prompt", "sortable": True},
    {"name": "completion", "label": "Completion tokens", "field": "completion", "sortable": True},
    {"name": "rpm", "label": "RPM limit", "field": "rpm"},
    {"name": "tpm", "label": "TPM limit", "field": "tpm"},
    {"name": "streams", "label": "Streams", "field": "streams"},
    {"name": "models", "label": "Models", "field": "models", "align": "left"},
    {"name": "expires", "label": "Expires", "field": "expires", "align": "left"},
]
DAY_COLUMNS: list[dict[str, Any]] = [
    {"name": c, "label": label, "field": c, "align": "left" if c in ("key", "day", "model") else "right",
     "sortable": True}
    for c, label in (("key", "Key"), ("day", "Day (UTC)"), ("model", "Model"), ("requests", "Requests"),
                     ("prompt_tokens", "Prompt tokens"), ("completion_tokens", "Completion tokens"))
]  # fmt: skip
EMPTY = (
    "No API keys yet. Make one with `chatbus keys create --name team-a --rpm 60 --tpm 20000 --expires 30d`."
)


def tokens_chart(report: UsageReport) -> dict[str, Any]:
    """Tokens per day, stacked by key."""
    days = sorted({u.day for u in report.usage})
    per: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for u in report.usage:
        per[u.key][u.day] += u.prompt_tokens + u.completion_tokens
    return {
        "tooltip": {"trigger": "axis"},
        "legend": {"top": 0},
        "grid": {"left": 60, "right": 20, "top": 35, "bottom": 30},
        "xAxis": {"type": "category", "data": days},
        "yAxis": {"type": "value", "name": "tokens"},
        "series": [{"type": "bar", "stack": "tokens", "name": key, "data": [per[key].get(d, 0) for d in days]}
                   for key in sorted(per)],
    }  # fmt: skip


class UsageView:
    def __init__(self, services: Services, storage: MutableMapping[str, Any]) -> None:
        self.s = services
        self.storage = storage
        self.root = ui.column().classes("w-full max-w-6xl mx-auto gap-4 px-2 pb-10")
        self.build()

    @property
    def signed_in(self) -> bool:
        token = self.s.config.admin_token
        return bool(token) and self.storage.get("admin") == admin_mark(token)

    def build(self) -> None:
        self.root.clear()
        with self.root:
            with ui.row().classes("w-full items-end"):
                title("data_usage", "Usage", "Requests and tokens per API key, per day and model (admins).")
                ui.space()
                if self.signed_in:
                    ui.button("Sign out", icon="logout", on_click=self._sign_out).props("flat no-caps")
            if self.signed_in:
                self._content()
            else:
                self._sign_in_form()

    def _sign_in_form(self) -> None:
        where = (
            f"{self.s.config.state_dir / 'admin-token'}"
            if self.s.config.state_dir
            else "CHATBUS_WEB_ADMIN_TOKEN"
        )
        with ui.card().classes("rounded-2xl max-w-xl").props("flat bordered").mark("admin-sign-in"):
            ui.label("For admins only").classes("font-medium text-lg")
            ui.label(
                "Sign in with the web app's admin token: it is in "
                f"{where} on the machine that runs the web app (or set CHATBUS_WEB_ADMIN_TOKEN there)."
            ).classes("text-grey-7 text-sm")
            self.token = (
                ui.input("Admin token", password=True, password_toggle_button=True)
                .props("outlined dense")
                .classes("w-full")
                .mark("admin-token")
            )
            self.token.on("keydown.enter", self._sign_in)
            ui.button("Sign in", icon="login", on_click=self._sign_in).props("unelevated no-caps").mark(
                "admin-sign-in-button"
            )

    def _sign_in(self) -> None:
        if not token_matches(str(self.token.value or ""), self.s.config.admin_token):
            ui.notify("That is not the admin token.", type="negative")
            return
        self.storage["admin"] = admin_mark(self.s.config.admin_token)
        self.build()

    def _sign_out(self) -> None:
        self.storage.pop("admin", None)
        self.build()

    def _content(self) -> None:
        self.message = (
            ui.label("Reading the key records…").classes("text-grey-7 w-full").mark("usage-message")
        )
        with ui.column().classes("w-full gap-4") as self.content:
            with ui.element("div").classes("cb-table-wrap"):
                self.keys = ui.table(columns=KEY_COLUMNS, rows=[], row_key="name").props("flat bordered")
                self.keys.classes("w-full rounded-2xl").mark("usage-keys")
            with ui.card().classes("w-full rounded-2xl").props("flat bordered"):
                ui.label("Tokens per day").classes("font-medium")
                self.chart = ui.echart(tokens_chart(UsageReport())).classes("w-full h-64")
            with ui.element("div").classes("cb-table-wrap"):
                self.days = ui.table(columns=DAY_COLUMNS, rows=[], row_key="id", pagination=20)
                self.days.props("flat bordered").classes("w-full rounded-2xl").mark("usage-days")
        self.content.visible = False
        ui.timer(5.0, self.refresh, immediate=True)

    async def refresh(self) -> None:
        report = await self.s.usage.read()
        if report.error:
            self.message.set_text(
                f"The bus refused the key and usage records ({report.error}). Check that nats-server "
                "is running; on a bus whose ui credential may not read cb_keys and cb_usage, start the web app "
                "with CHATBUS_WEB_USAGE_NATS set to a bus URL whose credential may (the admin's)."
            )
            self.message.classes(replace="text-negative w-full")
            return
        self.message.classes(replace="text-grey-7 w-full")
        self.message.set_text(EMPTY if not report.keys and not report.usage else "")
        self.message.visible = not report.keys and not report.usage
        self.content.visible = bool(report.keys or report.usage)
        self.keys.rows = key_rows(report)
        self.keys.update()
        self.days.rows = [{"id": i, **msgspec.structs.asdict(u)} for i, u in enumerate(report.usage)]
        self.days.update()
        self.chart.options.clear()
        self.chart.options.update(tokens_chart(report))
        self.chart.update()


def usage_page(services: Services, storage: MutableMapping[str, Any]) -> None:
    UsageView(services, storage)
