"""The Chat page's list of past chats, edit-and-resend and export, with NiceGUI's simulated user."""

from __future__ import annotations

import json

from nicegui import ElementFilter
from nicegui.testing import User
from procs import eventually
from test_webui import last_chat, nicegui_storage, services, simulated

from tui.conversation import Conversation
from webui.conversations import MAX_CHATS, Chats, title_of, to_json, to_markdown
from webui.services import Services

__all__ = ["nicegui_storage", "services"]  # fixtures, imported so that pytest finds them here


def titles(user: User) -> list[str]:
    """The chat titles in the side list (the first of the two panels: the phone dialog shows the same)."""
    with user:
        items = list(ElementFilter(marker="chat-title"))
    return [el.text for el in items[: len(items) // 2]]


def bubbles(user: User) -> list[str]:
    with user:
        return [el.text for el in ElementFilter(marker="user-bubble")]


async def ask(user: User, text: str) -> None:
    before = len(bubbles(user))
    user.find(marker="chat-input").type(text)
    user.find(marker="send").click()
    index = 2 * before + 1  # the answer's index in the conversation
    await eventually(lambda: bool(list_marked(user, f"stats-{index}")), timeout=60)


def list_marked(user: User, marker: str) -> list:
    with user:
        return list(ElementFilter(marker=marker))


async def test_chats_are_listed_searched_opened_renamed_and_deleted(services: Services) -> None:
    async with simulated(services) as user:
        await user.open("/")
        user.find(marker="clear").click()
        await ask(user, "apples grow on trees")
        user.find(marker="clear").click()  # New chat keeps the current one in the list
        await user.should_see("What can I help with?")
        assert titles(user) == ["apples grow on trees"]
        await ask(user, "bananas are yellow")
        await ask(user, "and curved")
        assert titles(user) == ["bananas are yellow", "apples grow on trees"]  # newest first
        search = list_marked(user, "chat-search")[0]
        search.set_value("CURVED")  # in a message, not the title
        await eventually(lambda: titles(user) == ["bananas are yellow"])
        search.set_value("")
        await eventually(lambda: len(titles(user)) == 2)
        user.find(marker="chat-item-1").click()  # open the apples chat
        await eventually(lambda: bubbles(user) == ["apples grow on trees"])
        await user.open("/")  # a reload shows the chat that was opened, and the list
        assert bubbles(user) == ["apples grow on trees"] and len(titles(user)) == 2
        user.find(marker="chat-rename-1").click()
        list_marked(user, "rename-input")[0].set_value("Fruit questions")
        user.find(marker="rename-save").click()
        await eventually(lambda: "Fruit questions" in titles(user))
        assert titles(user) == ["bananas are yellow", "Fruit questions"]  # opening does not reorder
        user.find(marker="chat-delete-0").click()  # bananas: not the open chat, which stays
        await eventually(lambda: titles(user) == ["Fruit questions"])
        assert bubbles(user) == ["apples grow on trees"]
        user.find(marker="chat-delete-0").click()  # the open chat: the page starts a new one
        await user.should_see("What can I help with?")
        await eventually(lambda: titles(user) == [], timeout=3)


async def test_edit_and_resend_replaces_what_came_after(services: Services) -> None:
    async with simulated(services) as user:
        await user.open("/")
        user.find(marker="clear").click()
        await ask(user, "one two three")
        await ask(user, "four five")
        user.find(marker="edit-0").click()
        list_marked(user, "edit-input")[0].set_value("six seven")
        user.find(marker="edit-send").click()
        await eventually(
            lambda: bool(list_marked(user, "stats-1")) and bubbles(user) == ["six seven"], timeout=20
        )
        await last_chat(services, lambda r: [m.content for m in r.messages] == ["six seven", "six seven"])


async def test_export_downloads_markdown_and_json(services: Services) -> None:
    async with simulated(services) as user:
        await user.open("/")
        user.find(marker="clear").click()
        await ask(user, "export this please")
        user.find(marker="export-md").click()
        markdown = (await user.download.next()).text  # type: ignore[attr-defined]
        assert markdown.startswith("# export this please") and "## You\n\nexport this please" in markdown
        user.find(marker="export-json").click()
        data = json.loads((await user.download.next()).text)  # type: ignore[attr-defined]
        assert (
            data["title"] == "export this please" and data["messages"][1]["content"] == "export this please"
        )
        loaded = Conversation.from_dict(data)  # the terminal chat's `!!load` reads it
        assert [m.content for m in loaded.messages] == ["export this please"] * 2


def test_chats_store_keeps_the_newest_and_exports() -> None:
    storage: dict = {}
    chats = Chats(storage)
    long = "word " * 30
    assert (
        title_of([{"role": "user", "content": long}]).endswith("…")
        and len(title_of([{"role": "user", "content": long}])) == 48
    )
    for i in range(MAX_CHATS + 5):
        chats.save({"conv_id": f"c{i}", "messages": [{"role": "user", "content": f"question {i}"}]})
    listed = chats.listing()
    assert len(listed) == MAX_CHATS and listed[0].id == f"c{MAX_CHATS + 4}" and "c0" not in storage["chats"]
    chats.save({"conv_id": "empty", "messages": []})
    assert chats.get("empty") is None
    state = {
        "conv_id": "x", "model": "m", "system": "be kind", "temperature": 0.3,
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello", "model": "m"}],
    }  # fmt: skip
    markdown = to_markdown(state, "Greeting")
    assert markdown == "# Greeting\n\n**System:** be kind\n\n## You\n\nhi\n\n## m\n\nhello\n"
    loaded = Conversation.from_dict(json.loads(to_json(state)))
    assert loaded.system == "be kind" and loaded.temperature == 0.3 and loaded.model == "m"
