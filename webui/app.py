"""Builds the web app: a root page with the shell and client-side routes to each page, and `run()`."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from typing import Any

from nicegui import app, ui

from bus import BusError, redact
from webui.config import WebConfig
from webui.layout import Shell
from webui.pages.chat import chat_page
from webui.pages.duel import DuelView
from webui.pages.jobs import job_page, jobs_page
from webui.pages.leaderboard import leaderboard_page
from webui.pages.nodes import nodes_page
from webui.pages.usage import usage_page
from webui.services import Services

__all__ = ["build_root", "run"]

log = logging.getLogger(__name__)


def _user_id() -> str:
    """A pseudonymous id of this browser session (rate limits, logs): never the raw cookie id."""
    return hashlib.sha256(str(app.storage.browser["id"]).encode()).hexdigest()[:16]


def build_root(get_services: Callable[[], Services], title: str = "chatbus") -> Callable[[], None]:
    """The root page function for `ui.run(root)`; each visit builds its own page objects."""

    def root() -> None:
        services = get_services()
        user = _user_id()
        storage: Any = app.storage.user
        shell = Shell(title, storage)

        def page(path: str, build: Callable[[], object]) -> Callable[[], None]:
            def show() -> None:
                shell.activate(path)
                build()

            return show

        def one_job(job_id: str) -> None:  # NiceGUI passes the path parameter by its name
            shell.activate("/jobs")
            job_page(services, job_id)

        ui.sub_pages(
            {
                "/": page("/", lambda: chat_page(services, user, storage)),
                "/side-by-side": page("/side-by-side", lambda: DuelView(services, user, anonymous=False)),
                "/arena": page("/arena", lambda: DuelView(services, user, anonymous=True)),
                "/leaderboard": page("/leaderboard", lambda: leaderboard_page(services)),
                "/nodes": page("/nodes", lambda: nodes_page(services)),
                "/jobs": page("/jobs", lambda: jobs_page(services)),
                "/jobs/{job_id}": one_job,
                "/usage": page("/usage", lambda: usage_page(services, storage)),
            }
        ).classes("w-full pt-4")

    return root


def run(config: WebConfig) -> int:
    """Connect to the bus on startup, serve until interrupted, close on shutdown; the exit code."""
    holder: dict[str, Services] = {}
    failed: list[str] = []

    async def startup() -> None:
        try:
            holder["services"] = await Services.start(config)
        except BusError as e:
            failed.append(str(e))
            log.error("web UI cannot start: %s", e)
            app.shutdown()
            return
        log.info("web UI on http://%s:%d, bus %s", config.host, config.port, redact(config.nats))
        if config.state_dir is not None:
            log.info(
                "admins sign in on /usage with CHATBUS_WEB_ADMIN_TOKEN or the token in %s",
                config.state_dir / "admin-token",
            )

    async def shutdown() -> None:
        services = holder.pop("services", None)
        if services is not None:
            await services.close()

    app.on_startup(startup)
    app.on_shutdown(shutdown)
    ui.run(
        build_root(lambda: holder["services"], config.title),
        host=config.host,
        port=config.port,
        title=config.title,
        favicon="💬",
        storage_secret=config.storage_secret,
        reload=False,
        show=False,
        show_welcome_message=False,
        uvicorn_logging_level="warning",
    )
    return 1 if failed else 0
