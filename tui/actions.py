"""What the in-chat `!!` commands do to the app: reset, remove, regen, copy, save, load, model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tui import inchat
from tui.conversation import Conversation, ConversationFileError
from tui.settings import Settings
from tui.widgets import Answer, UserTurn

if TYPE_CHECKING:
    from tui.app import ChatApp

__all__ = ["run_command"]


async def run_command(app: ChatApp, command: inchat.Command) -> None:
    name, arg = command.name, command.arg
    if name == "!!exit":
        app.exit(0)
    elif name == "!!help":
        app.notice(inchat.help_text())
    elif app.generating:
        app.notice(f"still answering — press Esc before {name}", "warning")
    elif name == "!!reset":
        app.conv.reset()
        await app.transcript.remove_children()
        app.notice("new conversation")
    elif name == "!!remove":
        if not app.conv.remove_exchange():
            app.notice("nothing to remove", "warning")
            return
        await _remove_last_turn(app)
        app.notice("removed the last exchange")
    elif name == "!!regen":
        if app.conv.drop_answer() is None:
            app.notice("nothing to regenerate: ask something first", "warning")
            return
        await _remove_last_answer(app)
        questions = app.transcript.query(UserTurn)
        app.start_answer(after=questions.last() if questions else None)  # under its question
    elif name == "!!copy":
        _copy_last_answer(app)
    elif name == "!!save":
        _save(app, _path(app, arg))
    elif name == "!!load":
        await _load(app, _path(app, arg))
    elif name == "!!model":
        if arg not in app.served:
            served = ", ".join(sorted(app.served)) or "none (is a node running?)"
            app.notice(f"no node serves {arg!r}; served models: {served}", "error")
            return
        app.switch_model(arg, quiet=False)
        app.query_one(Settings).show_models(app.served, arg)


def _copy_last_answer(app: ChatApp) -> None:
    answer = next((m.content for m in reversed(app.conv.messages) if m.role == "assistant"), None)
    if answer is None:
        app.notice("nothing to copy: no answer yet", "warning")
        return
    app.copy_to_clipboard(answer)  # OSC 52: works over ssh and in tmux (with `set -g set-clipboard on`)
    app.notice(f"copied the last answer ({len(answer)} characters) through the terminal's clipboard")


def _path(app: ChatApp, arg: str) -> Path:
    return app.cfg.cwd / Path(arg).expanduser()


def _save(app: ChatApp, path: Path) -> None:
    try:
        app.conv.save(path)
    except OSError as e:
        app.notice(f"cannot save to {path}: {e.strerror or e}", "error")
        return
    app.notice(f"saved {len(app.conv.messages)} messages to {path}")


async def _load(app: ChatApp, path: Path) -> None:
    try:
        loaded = Conversation.load(path)
    except ConversationFileError as e:
        app.notice(str(e), "error")
        return
    if not loaded.model:
        loaded.model = app.conv.model
    app.conv = loaded
    app.sub_title = loaded.model
    app.query_one(Settings).show_conversation(loaded)
    app.query_one(Settings).show_models(app.served, loaded.model)
    await app.transcript.remove_children()
    for m in loaded.messages:
        turn = UserTurn(m.content) if m.role == "user" else Answer(m.content, status="(loaded)")
        await app.transcript.mount(turn)
    app.notice(f"loaded {len(loaded.messages)} messages from {path}")
    if loaded.model and loaded.model not in app.served:
        app.notice(f"the file's model {loaded.model} is not served now; pick another (F2)", "warning")


async def _remove_last_answer(app: ChatApp) -> None:
    """For !!regen: the answer shown after the last question goes (notices stay)."""
    for widget in reversed(app.transcript.children):
        if isinstance(widget, UserTurn):
            return
        if isinstance(widget, Answer):
            await widget.remove()
            return


async def _remove_last_turn(app: ChatApp) -> None:
    """Remove the last UserTurn and everything shown after it."""
    children = list(app.transcript.children)
    for i in range(len(children) - 1, -1, -1):
        if isinstance(children[i], UserTurn):
            await app.transcript.remove_children(children[i:])
            return
    await app.transcript.remove_children(children[-1:])
