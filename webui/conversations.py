"""A browser's saved chats (in its NiceGUI user storage): list, search, rename, delete, and export.

UI-free: the Chat page keeps its current conversation in `storage["chat"]` and files a copy here
after every answer, so the list survives reloads and restarts (the storage lives in the state dir).
The JSON export is the terminal chat's file format, so `!!load` in `chatbus chat` reads it.
"""

from __future__ import annotations

import json
import time
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any

__all__ = ["FORMAT", "MAX_CHATS", "ChatSummary", "Chats", "title_of", "to_json", "to_markdown"]

FORMAT = "chatbus.conversation.v1"  # the same as tui.conversation.FORMAT
MAX_CHATS = 200  # the oldest go first beyond this
_PARAMS = ("temperature", "top_p", "max_tokens", "repetition_penalty")


@dataclass(frozen=True)
class ChatSummary:
    id: str
    title: str
    updated: float
    turns: int


def title_of(messages: list[dict[str, Any]]) -> str:
    """The first question, on one line and cut at 48 characters."""
    first = next((m["content"] for m in messages if m["role"] == "user"), "")
    line = " ".join(first.split())
    return line if len(line) <= 48 else line[:47].rstrip() + "…"


class Chats:
    """The saved chats of one browser: a dict of id -> {title, updated, model, system, params, messages}."""

    def __init__(self, storage: MutableMapping[str, Any]) -> None:
        if not isinstance(storage.get("chats"), dict):
            storage["chats"] = {}
        self._chats: MutableMapping[str, Any] = storage["chats"]

    def save(self, state: MutableMapping[str, Any]) -> None:
        """File (or refresh) the current conversation `state`; an empty one is not kept."""
        if not state.get("messages"):
            return
        conv_id = state["conv_id"]
        old = self._chats.get(conv_id) or {}
        self._chats[conv_id] = {
            "title": old.get("title") or title_of(state["messages"]),
            "updated": time.time(),
            "model": state.get("model") or "",
            "system": state.get("system") or "",
            "params": {k: state[k] for k in _PARAMS if k in state},
            "messages": [dict(m) for m in state["messages"]],
        }
        for stale in sorted(self._chats, key=lambda k: self._chats[k]["updated"])[: -MAX_CHATS or None]:
            del self._chats[stale]

    def get(self, conv_id: str) -> dict[str, Any] | None:
        chat = self._chats.get(conv_id)
        return dict(chat) if chat else None

    def listing(self, query: str = "") -> list[ChatSummary]:
        """Newest first; `query` (case ignored) must occur in the title or in a message."""
        q = query.strip().lower()
        out = []
        for conv_id, chat in self._chats.items():
            text = " ".join([chat["title"], *(m["content"] for m in chat["messages"])]).lower()
            if not q or q in text:
                turns = sum(1 for m in chat["messages"] if m["role"] == "user")
                out.append(ChatSummary(conv_id, chat["title"], chat["updated"], turns))
        return sorted(out, key=lambda c: -c.updated)

    def rename(self, conv_id: str, title: str) -> None:
        chat = self._chats.get(conv_id)
        if chat is not None and title.strip():
            self._chats[conv_id] = {**chat, "title": " ".join(title.split())[:120]}

    def delete(self, conv_id: str) -> None:
        self._chats.pop(conv_id, None)


def to_json(state: MutableMapping[str, Any], title: str = "") -> str:
    """The conversation in the terminal chat's file format (plus its title)."""
    data = {
        "format": FORMAT,
        "title": title or title_of(state["messages"]),
        "model": state.get("model") or "",
        "system": state.get("system") or "",
        "params": {k: state[k] for k in _PARAMS if k in state},
        "messages": [{"role": m["role"], "content": m["content"]} for m in state["messages"]],
    }
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def to_markdown(state: MutableMapping[str, Any], title: str = "") -> str:
    """A readable transcript: the title, the system prompt, then each turn under its speaker."""
    lines = [f"# {title or title_of(state['messages']) or 'Chat'}", ""]
    if (state.get("system") or "").strip():
        lines += [f"**System:** {state['system'].strip()}", ""]
    for m in state["messages"]:
        who = "You" if m["role"] == "user" else (m.get("model") or state.get("model") or "Assistant")
        lines += [f"## {who}", "", m["content"].rstrip(), ""]
    return "\n".join(lines)
