"""The chat's widgets: the prompt box (Enter sends, history, completion), turns and notices."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.events import Key
from textual.message import Message
from textual.widgets import Markdown, Static, TextArea

__all__ = ["Answer", "Notice", "PromptInput", "UserTurn"]


_NEWLINE_KEYS = ("ctrl+j", "shift+enter", "alt+enter")


class PromptInput(TextArea):
    """Enter sends; Ctrl+J (or Shift/Alt+Enter) adds a line; Up/Down at the edges walk the history."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+j,shift+enter,alt+enter", "newline", "New line", show=True),
        Binding("tab", "complete", "Complete", show=False),
    ]

    class Submitted(Message):
        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    class CompleteRequested(Message):
        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    def __init__(self, **kwargs: object) -> None:
        super().__init__(soft_wrap=True, show_line_numbers=False, tab_behavior="focus", **kwargs)  # type: ignore[arg-type]
        self.sent: list[str] = []
        self._pos = 0  # == len(history): editing a new entry
        self._draft = ""

    async def _on_key(self, event: Key) -> None:
        if event.key in _NEWLINE_KEYS:
            # Here, not only through the binding: a binding's action runs after the keys already
            # queued, so a burst of keys (a paste without bracketed paste) put the newline last.
            event.stop()
            event.prevent_default()
            self.action_newline()
            return
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            text = self.text
            if text.strip():
                self.remember(text)
                self.clear()
                self.post_message(self.Submitted(text))
            return
        await super()._on_key(event)

    def remember(self, text: str) -> None:
        if not self.sent or self.sent[-1] != text:
            self.sent.append(text)
        self._pos = len(self.sent)
        self._draft = ""

    def set_text(self, text: str) -> None:
        self.text = text
        last = text.split("\n")
        self.move_cursor((len(last) - 1, len(last[-1])))

    def action_newline(self) -> None:
        self.insert("\n")

    def action_complete(self) -> None:
        self.post_message(self.CompleteRequested(self.text))

    def action_cursor_up(self, select: bool = False) -> None:
        if select or self.cursor_location[0] > 0 or not self.sent or self._pos == 0:
            super().action_cursor_up(select)
            return
        if self._pos == len(self.sent):
            self._draft = self.text
        self._pos -= 1
        self.set_text(self.sent[self._pos])

    def action_cursor_down(self, select: bool = False) -> None:
        if select or self.cursor_location[0] < self.document.line_count - 1 or self._pos >= len(self.sent):
            super().action_cursor_down(select)
            return
        self._pos += 1
        self.set_text(self._draft if self._pos == len(self.sent) else self.sent[self._pos])


class UserTurn(Static):
    """What the user asked."""

    def __init__(self, text: str) -> None:
        super().__init__(text, markup=False)
        self.text = text


class Notice(Static):
    """A line from the app itself: an error, a warning, or what a command did."""

    def __init__(self, text: str, kind: str = "info") -> None:
        super().__init__(text, markup=False, classes=f"notice -{kind}")
        self.text = text
        self.kind = kind


class Answer(Vertical):
    """One streamed answer: Markdown (code highlighted) plus a status line (generating / stats)."""

    def __init__(self, text: str = "", status: str = "") -> None:
        super().__init__(classes="answer")
        self.text = text
        self.markdown = Markdown(text)
        self.status_text = status
        self.status = Static(status, classes="answer-status", markup=False)

    def compose(self) -> ComposeResult:
        yield self.markdown
        yield self.status

    def set_status(self, text: str, generating: bool = False) -> None:
        self.status_text = text
        self.status.update(text)
        self.set_class(generating, "-generating")
