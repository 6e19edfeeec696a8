"""The Textual chat app: talks to the bus itself (no gateway); `run_tui` is what `chatbus chat` runs."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from typing import ClassVar

from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, VerticalScroll
from textual.css.query import NoMatches
from textual.widget import Widget
from textual.widgets import Footer, Header, Input, Select, Static, TextArea
from textual.worker import Worker

from bus import BusClient, BusUnavailable, ChatStream, ModelEntry, redact
from tui import inchat
from tui.actions import run_command
from tui.answering import stream_answer
from tui.config import ChatConfig, config_from_args
from tui.conversation import Conversation
from tui.launcher import EmbeddedDefaults, is_local, port_of
from tui.plain import run_plain
from tui.settings import Settings, parse_param
from tui.widgets import Answer, Notice, PromptInput, UserTurn

__all__ = ["ChatApp", "ChatConfig", "run_tui"]

CSS = """
#transcript { height: 1fr; padding: 0 1; }
#settings { width: 44; border-left: solid $primary; padding: 0 1; display: none; }
#settings.-shown { display: block; }
#settings TextArea { height: 6; }
#status { height: 1; background: $panel; color: $text-muted; padding: 0 1; }
#status.-down { background: $error; color: $text; }
PromptInput { height: auto; max-height: 10; min-height: 3; }
UserTurn { margin: 1 0 0 0; padding: 0 1; background: $boost; border-left: thick $accent; }
.answer { height: auto; margin: 0 0 0 0; }
.answer Markdown { margin: 0; padding: 0 1; }
.answer-status { color: $text-muted; padding: 0 1; }
.answer.-generating .answer-status { color: $warning; text-style: bold; }
Notice { padding: 0 1; color: $text-muted; }
Notice.-warning { color: $warning; }
Notice.-error { color: $error; text-style: bold; }
"""


class ChatApp(App[int]):
    TITLE = "chatbus"
    CSS = CSS
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "stop", "Stop answer"),
        Binding("ctrl+c", "stop", "Stop", show=False, priority=True),
        Binding("f2", "toggle_settings", "Model & settings"),
        # Priority: the prompt box would take PageUp/PageDown for itself; the transcript scrolls while you type.
        Binding("pageup", "scroll_transcript(-1)", "Scroll up", show=False, priority=True),
        Binding("pagedown", "scroll_transcript(1)", "Scroll down", show=False, priority=True),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(self, cfg: ChatConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.url = cfg.url
        self.conv = Conversation(
            model=cfg.model or "",
            system=cfg.system,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            max_tokens=cfg.max_tokens,
            repetition_penalty=cfg.repetition_penalty,
        )
        self.client: BusClient | None = None
        self.embedded: EmbeddedDefaults | None = None
        self.stream: ChatStream | None = None
        self._gen: Worker[None] | None = None
        self.stop_requested = 0
        self.served: dict[str, ModelEntry] = {}
        self._connected = False
        self._warned_no_node = False
        self._fresh_client_wanted = False

    # ------------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal():
            yield VerticalScroll(id="transcript")
            yield Settings(self.conv)
        yield Static("connecting…", id="status", markup=False)
        yield PromptInput(
            id="prompt",
            placeholder="Ask something — Enter sends, Ctrl+J new line, !!help lists commands, Tab completes",
        )
        yield Footer()

    @property
    def transcript(self) -> VerticalScroll:
        return self.query_one("#transcript", VerticalScroll)

    @property
    def generating(self) -> bool:
        return self._gen is not None and self._gen.is_running

    def on_mount(self) -> None:
        self.sub_title = self.conv.model
        self.transcript.anchor()
        self.query_one(PromptInput).focus()
        self.run_worker(self._connect(), name="connect", group="connect", exit_on_error=False)

    async def on_unmount(self) -> None:
        if self.stream is not None:
            await self.stream.aclose()
        if self.client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.client.close(), 5)
        if self.embedded is not None:
            self.embedded.terminate()  # run_tui waits for it once the screen is given back

    def notice(self, text: str, kind: str = "info") -> Notice:
        note = Notice(text, kind)
        self.transcript.mount(note)
        return note

    def set_status(self, text: str, down: bool = False) -> None:
        status = self.query_one("#status", Static)
        status.update(text)
        status.set_class(down, "-down")

    # ------------------------------------------------------------------ the bus

    async def _connect(self) -> None:
        url = self.cfg.url
        try:
            self.client = await BusClient.connect(url, name="chatbus-tui")
        except BusUnavailable as e:
            if self.cfg.autostart and is_local(url):
                try:
                    url = await self._start_embedded(url)
                except (RuntimeError, TimeoutError, OSError) as failed:
                    self.notice(f"could not start the embedded defaults: {failed}", "error")
                    self.set_status(f"no bus at {redact(url)}", down=True)
                    return
            else:
                self.notice(f"{e}. Retrying every 2 s.", "error")
                self.set_status(f"bus {redact(url)} unreachable — retrying", down=True)
            while self.client is None:
                try:
                    self.client = await BusClient.connect(url, name="chatbus-tui")
                except BusUnavailable:
                    await asyncio.sleep(2)
        self.url = url
        self._connected = True
        self.set_interval(self.cfg.tick_s, self._tick)
        await self._tick()

    async def _start_embedded(self, url: str) -> str:
        self.notice(
            f"nothing answers at {redact(url)}: starting the embedded bus and the default model "
            "(`chatbus up --no-web --no-gateway`; the first start converts the model, ~20 s)…"
        )
        self.set_status("starting the embedded bus…")
        self.embedded = EmbeddedDefaults(port_of(url), self.cfg.state_dir)
        self.embedded.start()
        started = await self.embedded.wait_url()
        self.notice(f"embedded bus at {redact(started)}; it stops when you leave. Loading the model…")
        return started

    async def _tick(self) -> None:
        """Follow the connection and the live model list; say what changed."""
        client = self.client
        if client is None:
            return
        try:
            self._follow_bus(client)
        except NoMatches:  # the app is closing: its widgets are gone
            return

    def _follow_bus(self, client: BusClient) -> None:
        if client.connected != self._connected:
            self._connected = client.connected
            if self._connected:
                self.notice(f"bus is back ({redact(self.url)})")
                self._fresh_client_wanted = True
            else:
                self.notice(
                    f"lost the bus at {redact(self.url)}; reconnecting (answers pause until it is back)",
                    "error",
                )
        if self.embedded is not None and not self.embedded.alive() and self.embedded.process is not None:
            self.notice(f"the embedded `chatbus up` exited:\n{self.embedded.tail()}", "error")
            self.embedded.process = None
        if self._fresh_client_wanted and self._connected and not self.generating:
            self._fresh_client_wanted = False
            self.run_worker(self._fresh_client(client), group="connect", exit_on_error=False)
        self._follow_models(client)
        self._show_status(client)

    async def _fresh_client(self, old: BusClient) -> None:
        """After an outage, start over on a new client: a restarted server lost the in-memory
        node bucket and token stream, and the old client's node watch does not notice that."""
        try:
            self.client = await BusClient.connect(self.url, name="chatbus-tui")
        except BusUnavailable:
            self._fresh_client_wanted = True  # try again on a later tick
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(old.close(), 5)

    def _follow_models(self, client: BusClient) -> None:
        served = client.models()
        if _shape(served) != _shape(self.served):
            current = self.conv.model
            if current and current in self.served and current not in served:
                self.notice(
                    f"no node serves {current} any more; pick another model (F2 or !!model NAME)", "warning"
                )
            elif current and current not in self.served and current in served and self.served:
                self.notice(f"{current} is served again")
            if not current and served:
                self.switch_model(sorted(served)[0], quiet=False)
            self.served = dict(served)
            self.query_one(Settings).show_models(served, self.conv.model)
        if not served and not self._warned_no_node and self.embedded is None:
            self._warned_no_node = True
            self.notice(
                "no node is on the bus yet; start one with `chatbus up` or `python -m node --nats URL`"
            )

    def _show_status(self, client: BusClient) -> None:
        if not client.connected:
            self.set_status(f"bus {redact(self.url)} disconnected — reconnecting…", down=True)
            return
        entry = client.models().get(self.conv.model)
        if not self.conv.model:
            where = "waiting for a node…"
        elif entry is None:
            where = f"{self.conv.model}: no node serves it now"
        else:
            where = f"{self.conv.model} on {len(entry.nodes)} node(s)"
        c = self.conv
        self.set_status(
            f"bus {redact(self.url)} · {where} · temp {c.temperature} top_p {c.top_p} "
            f"max {c.max_tokens or 'ctx'} rep {c.repetition_penalty}"
        )

    def switch_model(self, name: str, quiet: bool = True) -> None:
        self.conv.model = name
        self.sub_title = name
        if not quiet:
            self.notice(f"model: {name}")

    # ------------------------------------------------------------------ input

    async def on_prompt_input_submitted(self, message: PromptInput.Submitted) -> None:
        text = message.text
        try:
            command = inchat.parse(text)
        except inchat.CommandError as e:
            self.notice(str(e), "error")
            return
        if command is not None:
            await run_command(self, command)
            return
        if self.generating:
            self.query_one(PromptInput).set_text(text)
            self.notice("still answering — press Esc to stop it first", "warning")
            return
        self.conv.add_user(text)
        await self.transcript.mount(UserTurn(text))
        self.start_answer()

    def on_prompt_input_complete_requested(self, message: PromptInput.CompleteRequested) -> None:
        completed, options = inchat.complete(message.text, self.served, self.cfg.cwd)
        if completed != message.text:
            self.query_one(PromptInput).set_text(completed)
        if len(options) > 1:
            self.notify("  ".join(options), title="completions", timeout=4)

    def on_select_changed(self, event: Select.Changed) -> None:
        if event.select.id == "model" and isinstance(event.value, str) and event.value != self.conv.model:
            self.switch_model(event.value, quiet=False)

    def on_text_area_changed(self, event: TextArea.Changed) -> None:
        if event.text_area.id == "system":
            self.conv.system = event.text_area.text

    def on_input_changed(self, event: Input.Changed) -> None:
        name = event.input.id or ""
        if name not in ("temperature", "top_p", "max_tokens", "repetition_penalty"):
            return
        try:
            setattr(self.conv, name, parse_param(name, event.value))
        except ValueError as e:
            event.input.set_class(True, "-invalid")
            event.input.tooltip = str(e)
            return
        event.input.set_class(False, "-invalid")

    def action_toggle_settings(self) -> None:
        settings = self.query_one(Settings)
        settings.toggle_class("-shown")
        focused = self.focused
        if "-shown" not in settings.classes and focused is not None and settings in focused.ancestors:
            self.query_one(PromptInput).focus()  # keys must not go on to a field that is now hidden

    def action_scroll_transcript(self, pages: int) -> None:
        if pages < 0:
            self.transcript.scroll_page_up()
        else:
            self.transcript.scroll_page_down()

    async def action_stop(self) -> None:
        if not self.generating:
            prompt = self.query_one(PromptInput)
            if prompt.text:
                prompt.clear()  # Esc with no answer running clears the input
                return
            self.notify("nothing to stop; Ctrl+Q or !!exit leaves", timeout=3)
            return
        self.stop_requested += 1
        if self.stop_requested > 1 and self._gen is not None:
            self._gen.cancel()  # the node did not react: stop listening (aclose still cancels it)
        elif self.stream is not None:
            with contextlib.suppress(Exception):
                await self.stream.cancel()

    # ------------------------------------------------------------------ answering

    def start_answer(self, after: Widget | None = None) -> None:
        """Stream the next answer into the transcript: at the end, or right `after` its question."""
        answer = Answer(status="● sending…")
        answer.set_status("● sending…", generating=True)
        self.transcript.mount(answer, after=after)
        self.stop_requested = 0
        self._gen = self.run_worker(self._generate(answer), name="answer", group="answer", exclusive=True)

    async def _generate(self, answer: Answer) -> None:
        await stream_answer(self, answer)


def _shape(served: dict[str, ModelEntry]) -> dict[str, list[str]]:
    return {name: sorted(n.node_id for n in entry.nodes) for name, entry in served.items()}


def run_tui(url: str, args: argparse.Namespace) -> int:
    """`chatbus chat` with no prompt on a terminal; `--plain` or a pipe prints the answer only."""
    cfg = config_from_args(url, args)
    problems = cfg.problems()
    if problems:  # e.g. --temperature 5: say so before the screen is taken over
        print(f"chatbus chat: {'; '.join(problems)}", file=sys.stderr)
        return 2
    if getattr(args, "plain", False) or not sys.stdout.isatty():
        return asyncio.run(run_plain(cfg, sys.stdin.read()))
    app = ChatApp(cfg)
    try:
        code = app.run()
    finally:
        if app.embedded is not None:
            print("chatbus: stopping the embedded bus and model…", file=sys.stderr, flush=True)
            app.embedded.stop()
    return int(code or 0)
