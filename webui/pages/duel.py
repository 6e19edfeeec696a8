"""Two models answer the same prompts in parallel: named side-by-side, or the anonymous arena.

In the arena two different models are drawn at random (models with fewer battles more often) and
stay hidden as "Model A" / "Model B" until the user votes (FastChat's leftvote / rightvote / tievote / bothbad_vote); then the names are
revealed and the battle is over. A battle whose answers name a model is logged but not rated.
"""

from __future__ import annotations

import asyncio
import random
import time

from nicegui import ui

from bus import ChatMessage, ConvState, VoteLog
from webui.answer import Answer, AnswerResult, new_id, reveals_identity
from webui.layout import assistant_bubble, empty_state, tool_button, typing_dots, user_bubble
from webui.limits import LimitExceeded
from webui.pages.common import (
    PARAM_DEFAULTS,
    Composer,
    ModelPicker,
    params_card,
    sampling_params,
    scroll_down,
    stats_line,
)
from webui.ratings import Battle, battle_counts, pair_probabilities
from webui.services import Services

__all__ = ["DuelView"]

VOTES = [
    ("leftvote", "A is better", "arrow_back"),
    ("rightvote", "B is better", "arrow_forward"),
    ("tievote", "Tie", "handshake"),
    ("bothbad_vote", "Both are bad", "thumb_down"),
]
SUGGESTIONS = [
    "Tell me a joke about computers",
    "Explain recursion to a child",
    "Write a haiku about the sea",
]


def draw_pair(names: list[str], battles: list[Battle], rng: random.Random | None = None) -> list[str]:
    """Two different models, new ones (fewer rated battles) more likely, in a random order."""
    played: dict[str, int] = {m: sum(row.values()) for m, row in battle_counts(battles).items()}
    pairs = pair_probabilities(sorted(names), played)
    rng = rng or random.Random()
    pair = rng.choices(list(pairs), weights=list(pairs.values()))[0]
    return list(pair) if rng.random() < 0.5 else [pair[1], pair[0]]


class DuelView:
    def __init__(self, services: Services, user: str, *, anonymous: bool) -> None:
        self.s = services
        self.user = user
        self.anonymous = anonymous
        self.mode = "arena" if anonymous else "side_by_side"
        self.models: list[str | None] = [None, None]
        self.histories: list[list[ChatMessage]] = [[], []]
        self.conv_ids = [new_id(), new_id()]
        self.answers: list[Answer] = []
        self.voted = False
        self.battle_id = new_id()
        self.params_state: dict[str, object] = {
            **PARAM_DEFAULTS,
            "max_tokens": services.config.default_max_tokens,
        }
        self.last_rows: list[ui.element] = []  # the latest answer on each side (regenerate replaces them)
        ui.context.client.on_delete(self.stop)  # a closed tab stops both answers on the nodes
        self._build()

    # ------------------------------------------------------------------ layout

    def _build(self) -> None:
        with ui.column().classes("w-full max-w-6xl mx-auto gap-4 px-2 pb-48"):
            with ui.row().classes("w-full items-center gap-3"):
                if self.anonymous:
                    with ui.column().classes("gap-0"):
                        with ui.row().classes("items-center gap-2"):
                            ui.icon("sports_mma", size="28px", color="primary")
                            ui.label("Arena").classes("text-2xl font-semibold")
                        ui.label(
                            "Two anonymous models answer. Vote for the better one — names are revealed after your vote."
                        ).classes("text-grey-6 text-sm")
                else:
                    self.pickers = [
                        ModelPicker(self.s, None, label="Model A", on_change=lambda m: self._pick(0, m)),
                        ModelPicker(self.s, None, label="Model B", on_change=lambda m: self._pick(1, m)),
                    ]
                    self._spread_pickers()
                ui.space()
                tool_button("Parameters", "tune", self._toggle_params, "params-toggle")
                tool_button("Regenerate", "refresh", self.regenerate, "regenerate")
                tool_button(
                    "New battle" if self.anonymous else "New round", "restart_alt", self.reset, "new-battle"
                )
            self.params = params_card(self.params_state)
            self.same_model = (
                ui.label("").classes("w-full text-center text-warning text-sm").mark("same-model")
            )
            self.same_model.visible = False
            self._warn_same()
            with ui.row().classes("cb-split w-full no-wrap gap-4 items-stretch"):
                self.columns = []
                self.names = []
                for side, label in enumerate(("Model A", "Model B")):
                    with (
                        ui.card().classes("w-1/2 rounded-2xl shadow-sm min-h-[200px]").props("flat bordered")
                    ):
                        with ui.row().classes("items-center gap-2"):
                            ui.badge("A" if side == 0 else "B", color="primary" if side == 0 else "accent")
                            name = ui.label(self._title(side, label)).classes("font-medium text-grey-8")
                            name.mark(f"side-{side}-name")
                            self.names.append(name)
                        col = ui.column().classes("w-full gap-4").mark(f"side-{side}")
                        self.columns.append(col)
            self.vote_row = ui.row().classes("w-full justify-center gap-3").mark("vote-row")
            self.vote_row.visible = False
            with self.vote_row:
                for kind, label, icon in VOTES:
                    ui.button(label, icon=icon, on_click=lambda k=kind: self.vote(k)).props(
                        "outline no-caps rounded"
                    ).mark(kind)
            self.verdict = ui.label("").classes("w-full text-center text-grey-7").mark("verdict")
        self.composer = Composer(
            "Ask both models…" if not self.anonymous else "Ask the arena anything…",
            on_send=self.send,
            on_stop=self.stop,
        )
        self._empty()

    def _toggle_params(self) -> None:
        self.params.set_visibility(not self.params.visible)

    def _title(self, side: int, label: str) -> str:
        if self.anonymous:
            return label
        return self.models[side] or label

    def _spread_pickers(self) -> None:
        """Default the second picker to a different model than the first, when there is one."""
        names = self.s.model_names()
        a, b = self.pickers
        if a.value and b.value == a.value:
            other = [n for n in names if n != a.value]
            if other:
                b.select.set_value(other[0])

    def _pick(self, side: int, model: str | None) -> None:
        self.models[side] = model
        if hasattr(self, "names"):
            self.names[side].set_text(self._title(side, ("Model A", "Model B")[side]))
        if hasattr(self, "same_model"):
            self._warn_same()

    def _warn_same(self) -> None:
        """Side-by-side compares two models: say so when both sides hold the same one (no vote then)."""
        a, b = self.models
        self.same_model.visible = bool(a) and a == b and not self.anonymous
        self.same_model.set_text(
            f"Both sides use {a}: answers can be compared, but there is no vote. "
            "Pick another model for B, or start one (`chatbus node --name other-name`)."
        )

    def _empty(self) -> None:
        for col in self.columns:
            col.clear()
        with self.columns[0]:
            empty_state("Ask a question", "Both answers stream side by side.", SUGGESTIONS[:2], self.send)
        with self.columns[1]:
            ui.label("").classes("h-1")

    # ------------------------------------------------------------------ actions

    def reset(self) -> None:
        if self.answers:
            ui.notify("Stop the answers first.", type="warning")
            return
        self.histories = [[], []]
        self.conv_ids = [new_id(), new_id()]
        self.battle_id = new_id()
        self.voted = False
        self.last_rows = []
        if self.anonymous:
            self.models = [None, None]
        for side in (0, 1):
            self.names[side].set_text(self._title(side, ("Model A", "Model B")[side]))
        self.vote_row.visible = False
        self.verdict.set_text("")
        self.composer.enable()
        self._empty()

    async def stop(self) -> None:
        for a in self.answers:
            await a.stop()

    def _draw(self) -> bool:
        names = self.s.model_names()
        if len(names) < 2:
            ui.notify(
                f"The arena needs two models online; {len(names)} {'is' if len(names) == 1 else 'are'} online now. "
                "Start another node (e.g. `chatbus node --name other-name`).",
                type="warning",
                multi_line=True,
            )
            return False
        self.models = [*draw_pair(names, self.s.logs.battles())]
        return True

    async def send(self, text: str) -> None:
        if self.answers or self.voted:
            return
        if self.anonymous and not self.histories[0] and not self._draw():
            return
        if not all(self.models):
            ui.notify("Pick two models first (start a node if none is online).", type="warning")
            return
        models = [m for m in self.models if m]
        problems = sampling_params(self.params_state).problems()
        if problems:
            ui.notify("Check the parameters: " + "; ".join(problems), type="warning", multi_line=True)
            return
        try:
            self.s.limiter.check_input(text, sum(len(m.content) for m in self.histories[0]))
            self.s.limiter.acquire(self.user, models)
        except LimitExceeded as e:
            ui.notify(str(e), type="warning", multi_line=True)
            return
        self.composer.clear()
        if not self.histories[0]:
            for col in self.columns:
                col.clear()
        self.vote_row.visible = False
        self.verdict.set_text("")  # the last round's verdict belongs to the last round
        for side in (0, 1):
            self.histories[side].append(ChatMessage(role="user", content=text))
            with self.columns[side]:
                user_bubble(text)
        await self._answer_both(models)

    async def _answer_both(self, models: list[str]) -> None:
        params = sampling_params(self.params_state)
        bodies = []
        self.last_rows = []
        for side in (0, 1):
            with self.columns[side]:
                body = (
                    assistant_bubble("Model A" if side == 0 else "Model B")
                    if self.anonymous
                    else assistant_bubble(models[side])
                )
                with body.column:  # type: ignore[attr-defined]
                    body.dots = typing_dots()  # type: ignore[attr-defined]
                bodies.append(body)
                self.last_rows.append(body.column.parent_slot.parent)  # type: ignore[attr-defined]
        self.answers = [
            Answer(
                self.s,
                model=models[side],
                messages=list(self.histories[side]),
                params=params,
                user=self.user,
                conv_id=self.conv_ids[side],
                mode=self.mode,  # type: ignore[arg-type]
                battle_id=self.battle_id,
            )
            for side in (0, 1)
        ]
        self.composer.busy(True)
        scroll_down(self.vote_row)
        try:
            results = await asyncio.gather(
                *(self._run(a, b) for a, b in zip(self.answers, bodies, strict=True))
            )
        finally:
            self.answers = []
            self.composer.busy(False)
        for side, (result, body) in enumerate(zip(results, bodies, strict=True)):
            self.histories[side].append(ChatMessage(role="assistant", content=result.text))
            if result.error:
                with body.column:  # type: ignore[attr-defined]
                    ui.label(result.error).classes("text-negative text-sm").mark("answer-error")
        self.vote_row.visible = models[0] != models[1]
        scroll_down(self.vote_row)

    @staticmethod
    async def _run(answer: Answer, body: ui.markdown) -> AnswerResult:
        first: list[float] = []

        def show(text: str) -> None:
            if text:
                first.append(first[0] if first else time.monotonic())
                body.dots.set_visibility(False)  # type: ignore[attr-defined]
            body.set_content(text)

        result = await answer.run(show)
        body.dots.delete()  # type: ignore[attr-defined]
        if result.text:
            with body.column:  # type: ignore[attr-defined]
                line = stats_line(result, time.monotonic() - first[0] if first else 0.0)
                if answer.mode == "arena":  # the node would tell which model answered
                    line = line.split(" · node ")[0]
                ui.label(line).classes("text-xs text-grey-5 cb-stats")
        return result

    async def regenerate(self) -> None:
        """Answer the last question again on both sides (before a vote: a vote closes the round)."""
        if self.answers or self.voted or not self.histories[0] or len(self.last_rows) != 2:
            return
        models = [m for m in self.models if m]
        try:
            self.s.limiter.acquire(self.user, models)
        except LimitExceeded as e:
            ui.notify(str(e), type="warning", multi_line=True)
            return
        for side in (0, 1):
            if self.histories[side][-1].role == "assistant":
                self.histories[side].pop()
            self.last_rows[side].delete()
        self.vote_row.visible = False
        self.verdict.set_text("")
        await self._answer_both(models)

    async def vote(self, kind: str) -> None:
        if self.voted or not self.histories[0] or not all(self.models) or self.models[0] == self.models[1]:
            return
        models = [m for m in self.models if m]
        try:
            self.s.limiter.vote(self.user)
        except LimitExceeded as e:
            ui.notify(str(e), type="warning", multi_line=True)
            return
        answers = [m.content for h in self.histories for m in h if m.role == "assistant"]
        leaked = self.anonymous and reveals_identity(answers, models)
        record = VoteLog(
            kind=kind,  # type: ignore[arg-type]
            tstamp=time.time(),
            mode=self.mode,  # type: ignore[arg-type]
            models=models,
            states=[
                ConvState(
                    conv_id=self.conv_ids[side], model=models[side], messages=list(self.histories[side])
                )
                for side in (0, 1)
            ],
            anonymous=self.anonymous,
            leaked_identity=leaked,
            battle_id=self.battle_id,
            user=self.user,
        )
        stored = await self.s.logs.append(record)
        self.vote_row.visible = False
        label = dict((k, v) for k, v, _ in VOTES)[kind]
        text = f"You voted: {label}."
        if self.anonymous:
            self.voted = True
            for side in (0, 1):
                self.names[side].set_text(f"{('Model A', 'Model B')[side]}: {models[side]}")
            text += f" Model A was {models[0]}, Model B was {models[1]}."
            if leaked:
                text += " An answer named a model, so this battle won't count toward the ratings."
            self.composer.disable("Battle over — start a new battle to vote again.")
        if not stored:
            text += " (Saved once the bus is back.)"
        self.verdict.set_text(text)
        ui.notify("Thanks for voting!", type="positive", timeout=1500)
