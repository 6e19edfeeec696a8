"""What several pages share: the live model picker, the message composer, the parameters panel, answer stats."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from nicegui import ui
from nicegui.events import ValueChangeEventArguments

from bus import SamplingParams
from webui.answer import AnswerResult
from webui.services import Services

__all__ = [
    "PARAM_DEFAULTS",
    "Composer",
    "ModelPicker",
    "params_card",
    "sampling_params",
    "scroll_down",
    "stats_line",
]

PARAM_DEFAULTS = {"temperature": 0.7, "top_p": 1.0, "repetition_penalty": 1.0}


def scroll_down(anchor: ui.element) -> None:
    """Scroll to the newest message; `anchor` names the page (the clicked button may be gone)."""
    anchor.client.run_javascript("window.scrollTo({top: document.body.scrollHeight})")


def stats_line(result: AnswerResult, streaming_s: float) -> str:
    """Under an answer: its tokens, the speed it streamed at and the node that gave it."""
    tokens = result.usage.completion_tokens
    speed = f" · {tokens / streaming_s:.1f} tok/s" if tokens and streaming_s > 0 else ""
    node = f" · node {result.node_id}" if result.node_id else ""
    return f"{tokens} tokens ({result.usage.prompt_tokens} prompt){speed}{node}"


def sampling_params(state: MutableMapping[str, Any]) -> SamplingParams:
    """What the parameters panel says, as the bus contract's struct (check `.problems()` before sending)."""
    return SamplingParams(
        temperature=float(state["temperature"]),
        top_p=float(state["top_p"]),
        max_tokens=int(state["max_tokens"]),
        repetition_penalty=float(state.get("repetition_penalty", 1.0)),
    )


def _slider(state: MutableMapping[str, Any], key: str, text: str, low: float, high: float) -> None:
    with ui.column().classes("grow gap-0 min-w-[140px]"):
        ui.label().bind_text_from(state, key, lambda v: text.format(v)).classes("text-sm text-grey-7")
        ui.slider(min=low, max=high, step=0.05).bind_value(state, key).props("label").mark(f"param-{key}")


def params_card(state: MutableMapping[str, Any], *, system: bool = False) -> ui.card:
    """The hidden-by-default parameters panel, bound to `state` (temperature, top_p, ... max_tokens)."""
    with ui.card().classes("w-full rounded-2xl shadow-sm").props("flat bordered") as card:
        if system:
            ui.textarea("System prompt", placeholder="You are a helpful assistant.").props(
                "outlined autogrow dense"
            ).classes("w-full").bind_value(state, "system")
        with ui.row().classes("w-full gap-8 items-center"):
            _slider(state, "temperature", "Temperature {:.2f}", 0, 2)
            _slider(state, "top_p", "Top-p {:.2f}", 0.05, 1)
            _slider(state, "repetition_penalty", "Repetition penalty {:.2f} (1 = off)", 1, 2)
            ui.number("Max tokens", min=1, max=8192, step=16, format="%d").bind_value(
                state, "max_tokens", forward=lambda v: int(v or 1)
            ).props("outlined dense").classes("w-32")
    card.visible = False
    return card


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
            .classes("cb-picker min-w-[170px] max-w-[60vw]")
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
        with ui.element("div").classes("cb-composer-strip fixed bottom-0 left-0 right-0 px-3 pb-5 pt-3 z-10"):
            with ui.row().classes(
                "cb-composer cb-surface max-w-3xl mx-auto w-full items-end no-wrap px-4 py-2 gap-2"
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
