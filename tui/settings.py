"""The side panel: model picker (from the live list), system prompt and sampling parameters."""

from __future__ import annotations

import msgspec
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import Input, Label, Select, TextArea

from bus import ModelEntry, SamplingParams
from tui.conversation import Conversation

__all__ = ["Settings", "parse_param"]


def parse_param(field: str, raw: str) -> float | int | None:
    """A parameter typed in the panel; ValueError with a message that says the allowed range."""
    raw = raw.strip()
    if field == "max_tokens":
        if not raw:
            return None  # up to the context length
        value = int(raw)
        if value < 1:
            raise ValueError(SamplingParams(max_tokens=value).problems()[0])
        return value
    number = float(raw)
    problems = msgspec.structs.replace(
        SamplingParams(), **{field: number}
    ).problems()  # the contract's ranges
    if problems:
        raise ValueError(problems[0])
    return number


class Settings(VerticalScroll):
    """Edits go to the app as the widgets' own Changed messages (ids say which field)."""

    def __init__(self, conv: Conversation) -> None:
        super().__init__(id="settings")
        self._conv = conv

    def compose(self) -> ComposeResult:
        yield Label("Model")
        yield Select[str]([], id="model", prompt="waiting for a node…", allow_blank=True)
        yield Label("System prompt")
        yield TextArea(self._conv.system, id="system", soft_wrap=True)
        yield Label("Temperature (0 = greedy)")
        yield Input(str(self._conv.temperature), id="temperature", type="number")
        yield Label("top_p")
        yield Input(str(self._conv.top_p), id="top_p", type="number")
        yield Label("Max tokens (empty: up to context)")
        yield Input(_text(self._conv.max_tokens), id="max_tokens", type="integer")
        yield Label("Repetition penalty (1 = off)")
        yield Input(str(self._conv.repetition_penalty), id="repetition_penalty", type="number")

    def show_models(self, served: dict[str, ModelEntry], current: str) -> None:
        """Refresh the picker without firing Select.Changed (only the user's picks do)."""
        select = self.query_one("#model", Select)
        options = [(name, name) for name in sorted(served)]  # the status line shows the node count
        if current and current not in served:
            options.append((f"{current}  (no node now)", current))
        with select.prevent(Select.Changed):
            select.set_options(options)
            if current:
                select.value = current

    def show_conversation(self, conv: Conversation) -> None:
        """After !!load: show the loaded system prompt and parameters."""
        self._conv = conv
        system = self.query_one("#system", TextArea)
        with system.prevent(TextArea.Changed):
            system.text = conv.system
        for field, value in (
            ("temperature", conv.temperature),
            ("top_p", conv.top_p),
            ("max_tokens", conv.max_tokens),
            ("repetition_penalty", conv.repetition_penalty),
        ):
            box = self.query_one(f"#{field}", Input)
            with box.prevent(Input.Changed):
                box.value = _text(value)


def _text(value: float | int | None) -> str:
    return "" if value is None else str(value)
