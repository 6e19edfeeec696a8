"""The list of a browser's past chats beside the Chat page (search, open, rename, delete) and the edit dialog."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from nicegui import ui

from webui.conversations import Chats, ChatSummary

__all__ = ["ChatsPanel", "edit_dialog"]


def _when(updated: float) -> str:
    age = time.time() - updated
    if age < 60:
        return "just now"
    if age < 3600:
        return f"{int(age // 60)} min ago"
    if age < 86400:
        return f"{int(age // 3600)} h ago"
    return time.strftime("%d %b", time.localtime(updated))


class ChatsPanel:
    """One view of the saved chats; several may show the same `Chats` (refresh them all after a change)."""

    def __init__(
        self,
        chats: Chats,
        *,
        current: Callable[[], str],
        on_open: Callable[[str], Awaitable[None]],
        on_delete: Callable[[str], None],
        on_rename: Callable[[], None],
    ) -> None:
        self._chats = chats
        self._current = current
        self._on_open = on_open
        self._on_delete = on_delete
        self._on_rename = on_rename
        self.query = ""
        with ui.column().classes("w-full gap-2 cb-chats"):
            ui.label("Your chats").classes("text-sm font-medium text-grey-7 pl-1")
            ui.input(placeholder="Search chats", on_change=lambda e: self._search(e.value or "")).props(
                "dense outlined rounded clearable"
            ).classes("w-full").mark("chat-search")
            self._list()

    def _search(self, query: str) -> None:
        self.query = query
        self._list.refresh()

    def refresh(self) -> None:
        self._list.refresh()

    @ui.refreshable_method
    def _list(self) -> None:
        found = self._chats.listing(self.query)
        if not found:
            ui.label("No chats found." if self.query else "Your chats appear here.").classes(
                "text-xs text-grey-5 pl-1"
            )
        with ui.column().classes("w-full gap-0"):
            for position, chat in enumerate(found):
                self._item(chat, position)

    def _item(self, chat: ChatSummary, position: int) -> None:
        current = chat.id == self._current()
        with (
            ui.row()
            .classes(
                "w-full items-center no-wrap gap-1 rounded-xl px-2 py-1 cursor-pointer hover:bg-grey-2"
                + (" cb-chat-current bg-grey-2" if current else "")
            )
            .mark(f"chat-item chat-item-{position}")
            .on("click", lambda: self._on_open(chat.id))
        ):
            with ui.column().classes("gap-0 grow min-w-0"):
                ui.label(chat.title or "Untitled").classes("text-sm truncate cb-chat-title").mark(
                    "chat-title"
                )
                ui.label(
                    f"{_when(chat.updated)} · {chat.turns} turn{'s' if chat.turns != 1 else ''}"
                ).classes("text-xs text-grey-5")
            ui.button(icon="edit", on_click=lambda: self._rename(chat)).props(
                "flat round dense size=sm color=grey-6"
            ).on("click.stop", lambda: None).tooltip("Rename").mark(f"chat-rename-{position}")
            ui.button(icon="delete_outline", on_click=lambda: self._on_delete(chat.id)).props(
                "flat round dense size=sm color=grey-6"
            ).on("click.stop", lambda: None).tooltip("Delete").mark(f"chat-delete-{position}")

    def _rename(self, chat: ChatSummary) -> None:
        with ui.dialog() as dialog, ui.card().classes("w-96"):
            ui.label("Rename chat").classes("font-medium")
            name = ui.input("Title", value=chat.title).props("outlined dense autofocus").classes("w-full")
            name.mark("rename-input")

            def save() -> None:
                self._chats.rename(chat.id, name.value or "")
                dialog.close()
                self._on_rename()

            name.on("keydown.enter", save)
            with ui.row().classes("w-full justify-end"):
                ui.button("Cancel", on_click=dialog.close).props("flat no-caps")
                ui.button("Save", on_click=save).props("unelevated no-caps").mark("rename-save")
        dialog.open()


def edit_dialog(text: str, on_send: Callable[[str], Awaitable[None]]) -> None:
    """A dialog to change an earlier question; Send hands the new text on."""
    with ui.dialog() as dialog, ui.card().classes("w-[36rem] max-w-full"):
        ui.label("Edit and resend").classes("font-medium")
        box = (
            ui.textarea(value=text).props("outlined autogrow autofocus").classes("w-full").mark("edit-input")
        )

        async def send() -> None:
            new = (box.value or "").strip()
            if new:
                dialog.close()
                await on_send(new)

        with ui.row().classes("w-full justify-end"):
            ui.button("Cancel", on_click=dialog.close).props("flat no-caps")
            ui.button("Send", icon="send", on_click=send).props("unelevated no-caps").mark("edit-send")
    dialog.open()
