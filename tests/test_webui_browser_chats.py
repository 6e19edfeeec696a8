"""The chats list, edit-and-resend and export in headless Chromium on the real model (two nodes)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from test_webui_browser import CHROMIUM, Page, app_url, free_port, nodes, page, webui_process, workdir

__all__ = ["app_url", "nodes", "page", "workdir"]  # fixtures, imported so that pytest finds them here

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)"),
    pytest.mark.model,
]

TITLES = "[...document.querySelectorAll('.cb-chats .cb-chat-title')].filter(e => e.offsetParent).map(e => e.innerText)"


async def ask(page: Page, text: str) -> None:
    """Send `text` and wait until every question on the page has its finished answer."""
    asked = int(await page.eval("document.querySelectorAll('.cb-bubble-user').length"))
    await page.type(".cb-input textarea", text)
    await page.click(".cb-send")
    await page.wait(f"document.querySelectorAll('.cb-bubble-user').length > {asked}")
    await page.wait(
        "document.querySelectorAll('.cb-stats').length === document.querySelectorAll('.cb-bubble-user').length"
        " && !document.querySelector('.cb-cursor')",
        timeout=300,
    )


async def menu_item(page: Page, text: str) -> None:
    js = f"[...document.querySelectorAll('.q-menu .q-item')].find(e => e.innerText.includes({json.dumps(text)}))"
    await page.wait(f"!!{js}")
    await page.eval(f"{js}.click()")


async def downloaded(folder: Path, suffix: str, timeout: float = 60.0) -> Path:
    """The file the browser saved into `folder` (whole: no partial download left)."""
    for _ in range(int(timeout * 10)):
        names = _names(folder)
        done = [n for n in names if n.endswith(suffix)]
        if done and not any(n.endswith(".crdownload") for n in names):
            return folder / done[0]
        await asyncio.sleep(0.1)
    raise AssertionError(f"no {suffix} file in {folder}: {_names(folder)}")


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


async def new_chat(page: Page) -> None:
    await page.click_text("New chat")
    await page.wait("document.body.innerText.includes('What can I help with?')")


async def test_chats_list_edit_resend_export_and_a_restart(
    page: Page, app_url: str, workdir: Path, nats_url: str
) -> None:
    await page.goto(app_url + "/")
    await page.wait("document.body.innerText.includes('arena-')")
    await new_chat(page)
    await ask(page, "What is the capital of France?")
    await new_chat(page)
    await ask(page, "Name a color.")
    assert await page.wait(f"{TITLES}.length === 2 && {TITLES}") == [
        "Name a color.",
        "What is the capital of France?",
    ]
    await page.screenshot("chats")
    # Open the first chat from the list.
    await page.eval(
        "[...document.querySelectorAll('.cb-chats .cb-chat-title')].find(e => e.offsetParent && e.innerText.startsWith('What is')).click()"
    )
    await page.wait(
        "[...document.querySelectorAll('.cb-bubble-user')].map(e => e.innerText).join('|') === 'What is the capital of France?'"
    )
    # Edit the question and send it again: the old answer goes, a new one comes.
    await page.eval("document.querySelector('.cb-edit').click()")
    await page.wait("!!document.querySelector('.q-dialog textarea')")
    await page.eval("document.querySelector('.q-dialog textarea').select()")
    await page.send("Input.insertText", text="What is the capital of Italy?")
    await page.click_text("Send")
    await page.wait(
        "[...document.querySelectorAll('.cb-bubble-user')].map(e => e.innerText).join('|') === 'What is the capital of Italy?'"
    )
    await page.wait(
        "document.querySelectorAll('.cb-stats').length === 1 && !document.querySelector('.cb-cursor')",
        timeout=300,
    )
    # Export: the browser saves a Markdown file with the edited question.
    downloads = workdir / "downloads"
    downloads.mkdir(exist_ok=True)
    await page.send("Browser.setDownloadBehavior", behavior="allow", downloadPath=str(downloads))
    await page.click_text("Export")
    await menu_item(page, "Markdown (.md)")
    markdown = (await downloaded(downloads, ".md")).read_text()
    assert (
        markdown.startswith("# What is the capital of France?")
        and "## You\n\nWhat is the capital of Italy?" in markdown
    )
    await page.click_text("Export")
    await menu_item(page, "JSON (.json)")
    exported = json.loads((await downloaded(downloads, ".json")).read_text())
    assert exported["messages"][0]["content"] == "What is the capital of Italy?"
    # A restart of the web app keeps the list (it lives in the state dir, per browser).
    port = free_port()
    with webui_process(nats_url, port, workdir / "state", workdir / "webui-restart.log"):
        await page.goto(f"http://127.0.0.1:{port}/")
        titles = await page.wait(f"{TITLES}.length === 2 && {TITLES}")
        assert titles == [
            "What is the capital of France?",
            "Name a color.",
        ]  # the edited one was updated last
