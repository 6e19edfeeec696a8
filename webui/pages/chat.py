"""The Chat page: one model, streaming Markdown, stop / regenerate / edit / copy / votes, parameters,
the list of past chats and export.

The conversation lives in the browser's server-side user storage, so a reload shows it again, and
each one is filed in the chats list (`webui.conversations`) when it changes.
"""

from __future__ import annotations

import time
from collections.abc import MutableMapping
from typing import Any

from nicegui import ui

from bus import ChatMessage, ConvState, SamplingParams, VoteLog
from webui.answer import Answer, new_id
from webui.conversations import Chats, title_of, to_json, to_markdown
from webui.layout import assistant_bubble, empty_state, tool_button, typing_dots, user_bubble
from webui.limits import LimitExceeded
from webui.pages.chats_panel import ChatsPanel, edit_dialog
from webui.pages.common import Composer, ModelPicker, params_card, sampling_params, scroll_down, stats_line
from webui.services import Services

__all__ = ["chat_page"]

SUGGESTIONS = [
    "Explain NATS JetStream in two sentences",
    "Write a Python function that reverses a string",
    "Give me three names for a cat",
    "What is the capital of France?",
]
_VOTE_ICONS = [
    ("upvote", "thumb_up", "positive"),
    ("downvote", "thumb_down", "negative"),
    ("flag", "flag", "warning"),
]


def _defaults(services: Services) -> dict[str, Any]:
    return {
        "model": None,
        "system": "",
        "temperature": 0.7,
        "top_p": 1.0,
        "max_tokens": services.config.default_max_tokens,
        "repetition_penalty": 1.0,
        "conv_id": new_id(),
        "messages": [],
    }


class ChatView:
    def __init__(self, services: Services, user: str, storage: MutableMapping[str, Any]) -> None:
        self.s = services
        self.user = user
        if not isinstance(storage.get("chat"), dict):
            storage["chat"] = _defaults(services)
        self.state: MutableMapping[str, Any] = storage["chat"]
        for k, v in _defaults(services).items():
            self.state.setdefault(k, v)
        self.chats = Chats(storage)
        self.panels: list[ChatsPanel] = []
        self.answer: Answer | None = None
        # A closed tab stops its answer on the node (once NiceGUI gives up waiting for a reconnect).
        ui.context.client.on_delete(self.stop)
        self._build()

    # ------------------------------------------------------------------ layout

    def _build(self) -> None:
        with ui.row().classes("w-full no-wrap gap-6 px-2 items-start"):
            with ui.column().classes("gt-sm w-64 shrink-0 sticky top-20"):  # wide screens: always there
                self.panels.append(self._panel())
            with ui.column().classes("grow min-w-0 max-w-3xl mx-auto gap-4 pb-40"):
                with ui.row().classes("w-full items-center gap-2"):  # wraps on a phone
                    self.picker = ModelPicker(self.s, self.state.get("model"), on_change=self._model_changed)
                    ui.space()
                    tool_button("Chats", "history", self._show_chats, "chats-toggle").classes("lt-md")
                    tool_button("Parameters", "tune", self._toggle_params, "params-toggle")
                    with tool_button("Export", "download", lambda: None, "export"):
                        with ui.menu():
                            ui.menu_item("Markdown (.md)", lambda: self.export("md")).mark("export-md")
                            ui.menu_item("JSON (.json)", lambda: self.export("json")).mark("export-json")
                    tool_button("New chat", "add_comment", self.clear, "clear")
                self.params = params_card(self.state, system=True)
                self.thread = ui.column().classes("w-full gap-5").mark("thread")
        with ui.dialog() as self.chats_dialog, ui.card().classes("w-80 max-w-full"):
            self.panels.append(self._panel())
        self.composer = Composer("Message the model…", on_send=self.send, on_stop=self.stop)
        self.render()

    def _panel(self) -> ChatsPanel:
        return ChatsPanel(
            self.chats,
            current=lambda: self.state["conv_id"],
            on_open=self.open_chat,
            on_delete=self.delete_chat,
            on_rename=self._refresh_panels,
        )

    def _show_chats(self) -> None:
        self.chats_dialog.open()

    def _refresh_panels(self) -> None:
        for panel in self.panels:
            panel.refresh()

    def _file(self) -> None:
        """Keep the current conversation in the list (after each answer, vote or edit)."""
        self.chats.save(self.state)
        self._refresh_panels()

    def _toggle_params(self) -> None:
        self.params.set_visibility(not self.params.visible)

    def render(self) -> None:
        self.thread.clear()
        with self.thread:
            if not self.state["messages"]:
                empty_state(
                    "What can I help with?",
                    "Pick a model and ask anything — answers stream from nodes on the bus.",
                    SUGGESTIONS,
                    self.send,
                )
            msgs = self.state["messages"]
            for i, m in enumerate(msgs):
                if m["role"] == "user":
                    self._user_turn(i, m["content"])
                else:
                    body = assistant_bubble(m.get("model", ""), m["content"])
                    self._finish_bubble(body, i, m)

    def _user_turn(self, index: int, text: str) -> None:
        user_bubble(text)
        with ui.row().classes("w-full justify-end -mt-4"):
            ui.button(icon="edit", on_click=lambda: self._edit(index)).props(
                "flat round dense size=sm color=grey-5"
            ).classes("cb-edit").tooltip("Edit and resend").mark(f"edit-{index}")

    def _finish_bubble(self, body: ui.markdown, index: int, msg: dict[str, Any]) -> None:
        with body.column:  # type: ignore[attr-defined]
            if msg.get("error"):
                with ui.row().classes("items-center gap-2 text-negative text-sm").mark("answer-error"):
                    ui.icon("error_outline")
                    ui.label(msg["error"])
            if msg.get("finish_reason") == "cancelled":
                ui.label("stopped").classes("text-xs text-grey-5")
            with ui.row().classes("gap-0 -ml-2 text-grey-6 items-center"):
                ui.button(icon="content_copy", on_click=lambda: self._copy(msg["content"])).props(
                    "flat round dense size=sm color=grey-6"
                ).tooltip("Copy").mark(f"copy-{index}")
                voted = msg.get("vote")
                for kind, icon, color in _VOTE_ICONS:
                    button = ui.button(icon=icon, on_click=lambda k=kind: self.vote(index, k)).props(
                        f"flat round dense size=sm color={color if voted == kind else 'grey-6'}"
                    )
                    button.tooltip(kind.capitalize()).mark(f"{kind}-{index}")
                    if voted:
                        button.disable()  # one vote per answer: FastChat disables the buttons too
                if index == len(self.state["messages"]) - 1:
                    ui.button(icon="refresh", on_click=self.regenerate).props(
                        "flat round dense size=sm color=grey-6"
                    ).tooltip("Regenerate").mark("regenerate")
                if msg.get("stats"):
                    ui.label(msg["stats"]).classes("text-xs text-grey-5 pl-2 cb-stats").mark(f"stats-{index}")

    # ------------------------------------------------------------------ actions

    def _model_changed(self, model: str | None) -> None:
        self.state["model"] = model

    async def _copy(self, text: str) -> None:
        ui.clipboard.write(text)
        ui.notify("Copied to clipboard", type="positive", timeout=1200)

    def clear(self) -> None:
        """New chat: the current one stays in the list."""
        if self.answer is not None:
            ui.notify("Stop the answer first.", type="warning")
            return
        self.chats.save(self.state)
        self.state["messages"] = []
        self.state["conv_id"] = new_id()
        self.render()
        self._refresh_panels()

    async def open_chat(self, conv_id: str) -> None:
        if self.answer is not None:
            ui.notify("Stop the answer first.", type="warning")
            return
        chat = self.chats.get(conv_id)
        if chat is None:
            return
        self.chats.save(self.state)
        self.state["messages"] = chat["messages"]
        self.state["conv_id"] = conv_id
        self.state["system"] = chat.get("system", "")
        if chat.get("model") in self.s.model_names():
            self.picker.select.set_value(chat["model"])
        self.chats_dialog.close()
        self.render()
        self._refresh_panels()

    def delete_chat(self, conv_id: str) -> None:
        if conv_id == self.state["conv_id"]:
            if self.answer is not None:
                ui.notify("Stop the answer first.", type="warning")
                return
            self.state["messages"] = []
            self.state["conv_id"] = new_id()
            self.render()
        self.chats.delete(conv_id)
        self._refresh_panels()

    def export(self, kind: str) -> None:
        if not self.state["messages"]:
            ui.notify("Nothing to export yet.", type="warning")
            return
        saved = self.chats.get(self.state["conv_id"]) or {}
        title = saved.get("title") or title_of(self.state["messages"])
        name = "-".join("".join(c if c.isalnum() else " " for c in title.lower()).split())[:40] or "chat"
        if kind == "md":
            ui.download.content(to_markdown(self.state, title).encode(), f"{name}.md", "text/markdown")
        else:
            ui.download.content(to_json(self.state, title).encode(), f"{name}.json", "application/json")

    def _edit(self, index: int) -> None:
        """Edit an earlier question and send it again: what came after it is replaced."""

        async def resend(text: str) -> None:
            if self.answer is not None:
                return
            self.state["messages"] = self.state["messages"][:index]
            self.render()
            await self.send(text, keep_input=True)

        edit_dialog(self.state["messages"][index]["content"], resend)

    async def stop(self) -> None:
        if self.answer is not None:
            await self.answer.stop()

    def _history(self) -> list[ChatMessage]:
        msgs = (
            [ChatMessage(role="system", content=self.state["system"])] if self.state["system"].strip() else []
        )
        for m in self.state["messages"]:
            if m["content"]:
                msgs.append(ChatMessage(role=m["role"], content=m["content"]))
        return msgs

    async def send(self, text: str, keep_input: bool = False) -> None:
        if self.answer is not None:
            return
        model = self.picker.value
        if not model:
            ui.notify(
                "No model is online yet: start a node (`chatbus up` or `python -m node`).", type="warning"
            )
            return
        problems = self._params().problems()
        if problems:
            ui.notify("Check the parameters: " + "; ".join(problems), type="warning", multi_line=True)
            return
        try:
            self.s.limiter.check_input(text, sum(len(m["content"]) for m in self.state["messages"]))
            self.s.limiter.acquire(self.user, [model])
        except LimitExceeded as e:
            ui.notify(str(e), type="warning", multi_line=True)
            return
        if not keep_input:
            self.composer.clear()
        if not self.state["messages"]:
            self.thread.clear()
        self.state["messages"].append({"role": "user", "content": text})
        with self.thread:
            self._user_turn(len(self.state["messages"]) - 1, text)
        await self._answer(model)

    async def regenerate(self) -> None:
        msgs = self.state["messages"]
        if self.answer is not None or not msgs or msgs[-1]["role"] != "assistant":
            return
        model = self.picker.value or msgs[-1].get("model")
        try:
            self.s.limiter.acquire(self.user, [model])
        except LimitExceeded as e:
            ui.notify(str(e), type="warning", multi_line=True)
            return
        msgs.pop()
        self.render()
        await self._answer(model)

    def _params(self) -> SamplingParams:
        return sampling_params(self.state)

    async def _answer(self, model: str) -> None:
        st = self.state
        params = self._params()
        with self.thread:
            body = assistant_bubble(model).classes("cb-cursor")
            with body.column:  # type: ignore[attr-defined]
                dots = typing_dots()
        self.answer = Answer(
            self.s,
            model=model,
            messages=self._history(),
            params=params,
            user=self.user,
            conv_id=st["conv_id"],
        )
        self.composer.busy(True)
        scroll_down(self.thread)

        first: list[float] = []

        def show(text: str) -> None:
            if text:
                first.append(first[0] if first else time.monotonic())
                dots.set_visibility(False)
            body.set_content(text)
            scroll_down(self.thread)

        try:
            result = await self.answer.run(show)
        finally:
            self.answer = None
            self.composer.busy(False)
        dots.delete()
        body.classes(remove="cb-cursor")
        if result.error and not result.text:
            self._give_back(result.error)
            return
        msg = {
            "role": "assistant",
            "content": result.text,
            "model": model,
            "finish_reason": result.finish_reason,
            "stats": stats_line(result, time.monotonic() - first[0] if first else 0.0),
        }
        if result.error:
            msg["error"] = result.error
        st["messages"].append(msg)
        self._finish_bubble(body, len(st["messages"]) - 1, msg)
        self._file()

    def _give_back(self, error: str) -> None:
        """Nothing was answered: the question leaves the conversation and goes back into the input."""
        msgs = self.state["messages"]
        question = msgs.pop()["content"] if msgs and msgs[-1]["role"] == "user" else ""
        self.state["messages"] = list(msgs)
        self.render()
        if question and not (self.composer.input.value or "").strip():
            self.composer.input.value = question
        with self.thread:
            with ui.row().classes("items-center gap-2 text-negative text-sm").mark("answer-error"):
                ui.icon("error_outline")
                ui.label(f"No answer: {error}. Your message is back in the input.")

    async def vote(self, index: int, kind: str) -> None:
        msgs = self.state["messages"]
        msg = msgs[index]
        if msg.get("vote"):  # already counted (a double click, or a stale button)
            return
        history = [ChatMessage(role=m["role"], content=m["content"]) for m in msgs[: index + 1]]
        if self.state["system"].strip():
            history.insert(0, ChatMessage(role="system", content=self.state["system"]))
        state = ConvState(conv_id=self.state["conv_id"], model=msg.get("model", ""), messages=history)
        vote = VoteLog(
            kind=kind,  # type: ignore[arg-type]
            tstamp=time.time(),
            mode="chat",
            models=[state.model],
            states=[state],
            user=self.user,
        )
        stored = await self.s.logs.append(vote)
        msg["vote"] = kind
        self.state["messages"] = list(msgs)  # a new list: the session storage saves it
        self.render()  # deletes the clicked button: later calls need an explicit context
        self._file()
        thanks = {
            "upvote": "Thanks for the upvote!",
            "downvote": "Thanks, noted.",
            "flag": "Flagged for review.",
        }[kind]
        with self.thread:
            ui.notify(
                thanks if stored else thanks + " (saved once the bus is back)", type="positive", timeout=1500
            )


def chat_page(services: Services, user: str, storage: MutableMapping[str, Any]) -> None:
    ChatView(services, user, storage)
