"""The Chat page: one model, streaming Markdown, stop / regenerate / clear / copy / votes, parameters.

The conversation lives in the browser session's server-side storage, so a reload shows it again.
"""

from __future__ import annotations

import time
from collections.abc import MutableMapping
from typing import Any

from nicegui import ui

from bus import ChatMessage, SamplingParams
from bus.schemas_logs import ConvState, VoteLog
from webui.answer import Answer, AnswerResult, new_id
from webui.layout import assistant_bubble, empty_state, tool_button, typing_dots, user_bubble
from webui.limits import LimitExceeded
from webui.pages.common import Composer, ModelPicker, params_card, sampling_params, scroll_down
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
        self.answer: Answer | None = None
        # A closed tab stops its answer on the node (once NiceGUI gives up waiting for a reconnect).
        ui.context.client.on_delete(self.stop)
        self._build()

    # ------------------------------------------------------------------ layout

    def _build(self) -> None:
        with ui.column().classes("w-full max-w-3xl mx-auto gap-4 px-2 pb-40"):
            with ui.row().classes("w-full items-center gap-2 no-wrap"):
                self.picker = ModelPicker(self.s, self.state.get("model"), on_change=self._model_changed)
                ui.space()
                tool_button("Parameters", "tune", self._toggle_params, "params-toggle")
                tool_button("New chat", "add_comment", self.clear, "clear")
            self.params = params_card(self.state, system=True)
            self.thread = ui.column().classes("w-full gap-5").mark("thread")
        self.composer = Composer("Message the model…", on_send=self.send, on_stop=self.stop)
        self.render()

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
                    user_bubble(m["content"])
                else:
                    body = assistant_bubble(m.get("model", ""), m["content"])
                    self._finish_bubble(body, i, m)

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
        if self.answer is not None:
            ui.notify("Stop the answer first.", type="warning")
            return
        self.state["messages"] = []
        self.state["conv_id"] = new_id()
        self.render()

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

    async def send(self, text: str) -> None:
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
        self.composer.clear()
        if not self.state["messages"]:
            self.thread.clear()
        self.state["messages"].append({"role": "user", "content": text})
        with self.thread:
            user_bubble(text)
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
        thanks = {
            "upvote": "Thanks for the upvote!",
            "downvote": "Thanks, noted.",
            "flag": "Flagged for review.",
        }[kind]
        with self.thread:
            ui.notify(
                thanks if stored else thanks + " (saved once the bus is back)", type="positive", timeout=1500
            )


def stats_line(result: AnswerResult, streaming_s: float) -> str:
    """Under an answer: its tokens, the speed it streamed at and the node that gave it."""
    tokens = result.usage.completion_tokens
    speed = f" · {tokens / streaming_s:.1f} tok/s" if tokens and streaming_s > 0 else ""
    node = f" · node {result.node_id}" if result.node_id else ""
    return f"{tokens} tokens ({result.usage.prompt_tokens} prompt){speed}{node}"


def chat_page(services: Services, user: str, storage: MutableMapping[str, Any]) -> None:
    ChatView(services, user, storage)
