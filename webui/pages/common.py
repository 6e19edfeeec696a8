"""Widgets several pages share: the live model picker and the message composer."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from nicegui import ui
from nicegui.events import ValueChangeEventArguments

from webui.services import Services

__all__ = ["Composer", "ModelPicker", "scroll_down"]


def scroll_down(anchor: ui.element) -> None:
    """Scroll to the newest message; `anchor` names the page (the clicked button may be gone)."""
    anchor.client.run_javascript("window.scrollTo({top: document.body.scrollHeight})")


class ModelPicker:
    """A select of the models served right now, refreshed from node heartbeats."""

    def __init__(
        self,
        services: Services,
        value: str | None,
        *,
        label: str = "Model",
        on_change: Callable[[str | None], None] | None = None,
        exclude: Callable[[], str | None] | None = None,
    ) -> None:
        self._s = services
        self._on_change = on_change
        names = services.model_names()
        if value not in names:
            value = names[0] if names else None
        self.select = (
            ui.select(self._options(names, value), value=value, label=label, on_change=self._changed)
            .props("outlined dense rounded options-dense")
            .classes("min-w-[220px]")
        )
        self.offline = ui.badge("offline", color="negative").props("outline")
        self.offline.visible = False
        ui.timer(2.0, self._refresh)
        if on_change:
            on_change(value)

    @property
    def value(self) -> str | None:
        return self.select.value

    @staticmethod
    def _options(names: list[str], current: str | None) -> list[str]:
        return names if current is None or current in names else [*names, current]

    def _changed(self, e: ValueChangeEventArguments) -> None:
        if self._on_change:
            self._on_change(e.value)

    def _refresh(self) -> None:
        names = self._s.model_names()
        value = self.select.value
        if value is None and names:
            value = names[0]
        options = self._options(names, value)
        if options != self.select.options or value != self.select.value:
            self.select.set_options(options, value=value)
        self.offline.visible = value is not None and value not in names


class Composer:
    """The message box pinned to the bottom: Enter sends, Shift+Enter breaks the line, Stop stops."""

    def __init__(
        self,
        placeholder: str,
        *,
        on_send: Callable[[str], Awaitable[None]],
        on_stop: Callable[[], Awaitable[None]],
    ) -> None:
        self._on_send = on_send
        self._on_stop = on_stop
        self._busy = False
        with (
            ui.element("div")
            .classes("fixed bottom-0 left-0 right-0 px-3 pb-5 pt-3 z-10")
            .style("background: linear-gradient(to top, var(--cb-bg, #f6f7fb) 70%, transparent)")
        ):
            with ui.row().classes(
                "cb-composer bg-white max-w-3xl mx-auto w-full items-end no-wrap px-4 py-2 gap-2"
            ):
                self.input = (
                    ui.textarea(placeholder=placeholder)
                    .props("autogrow borderless dense input-style='max-height: 200px'")
                    .classes("grow text-[15px] cb-input")
                    .mark("chat-input")
                )
                self.input.on("keydown.enter.exact.prevent", self._send)
                self.button = (
                    ui.button(icon="arrow_upward", on_click=self._click)
                    .props("round unelevated color=primary")
                    .classes("cb-send")
                    .mark("send")
                )
            self.hint = ui.label("Enter to send · Shift+Enter for a new line").classes(
                "text-center text-xs text-grey-5 w-full pt-1"
            )

    def clear(self) -> None:
        self.input.value = ""

    def busy(self, busy: bool) -> None:
        self._busy = busy
        self.button.props(f"icon={'stop' if busy else 'arrow_upward'}")
        self.button.classes(add="cb-stop" if busy else "", remove="" if busy else "cb-stop")

    def disable(self, message: str) -> None:
        self.input.disable()
        self.button.disable()
        self.hint.set_text(message)

    def enable(self, hint: str = "Enter to send · Shift+Enter for a new line") -> None:
        self.input.enable()
        self.button.enable()
        self.hint.set_text(hint)

    async def _click(self) -> None:
        if self._busy:
            await self._on_stop()
        else:
            await self._send()

    async def _send(self) -> None:
        text = (self.input.value or "").strip()
        if self._busy or not text:
            return
        await self._on_send(text)
