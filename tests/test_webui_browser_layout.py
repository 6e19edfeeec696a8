"""The web app's look in headless Chromium (dark mode, a 390 px phone, toasts) on scripted echo nodes:
what only a real browser's CSS shows (issue 18, bugs 1 and 8)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fakes import EchoEngine, echo_node
from test_webui_browser import CHROMIUM, DOCS_IMG, Page, free_port, page, webui_process, workdir

from bus import BusClient

__all__ = ["page", "workdir"]  # fixtures, imported so that pytest finds them here

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)"
)

LUMINANCE = """(color) => {
  const [r, g, b] = color.match(/[\\d.]+/g).slice(0, 3).map(Number).map(v => v / 255)
    .map(v => v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4);
  return 0.2126 * r + 0.7152 * g + 0.0722 * b;
}"""


WIDER_THAN_SCREEN = """[...document.querySelectorAll('body *')]
  .filter(e => e.getClientRects().length && e.getBoundingClientRect().right > 391)
  .slice(0, 8).map(e => e.tagName + '.' + e.className.slice(0, 40) + ' ' + Math.round(e.getBoundingClientRect().right) + ' ' + (e.innerText || '').slice(0, 20))"""


@pytest.fixture(scope="module")
async def echo_url(nats_url: str, client: BusClient, workdir: Path) -> AsyncIterator[str]:
    async with echo_node(nats_url, EchoEngine("echo-look", step_s=0.01)):
        for _ in range(100):
            if "echo-look" in client.models():
                break
            await asyncio.sleep(0.1)
        port = free_port()
        with webui_process(nats_url, port, workdir / "state", workdir / "webui.log"):
            yield f"http://127.0.0.1:{port}"


async def _phone_screenshot(page: Page, name: str) -> None:
    """As it looks at 390 px (`Page.screenshot` takes the desktop width); only with CHATBUS_SCREENSHOTS."""
    if os.environ.get("CHATBUS_SCREENSHOTS"):
        await asyncio.sleep(1.0)
        data = await page.send("Page.captureScreenshot", format="png")
        (DOCS_IMG / f"{name}.png").write_bytes(base64.b64decode(data["data"]))


async def _luminance(page: Page, selector: str, prop: str) -> float:
    color = await page.eval(
        f"getComputedStyle(document.querySelector({json.dumps(selector)}))[{json.dumps(prop)}]"
    )
    return float(await page.eval(f"({LUMINANCE})({json.dumps(color)})"))


async def test_dark_mode_covers_input_header_and_composer_and_is_remembered(
    page: Page, echo_url: str
) -> None:
    await page.goto(echo_url + "/")
    await page.eval(
        "[...document.querySelectorAll('button')].find(b => b.innerText.trim() === 'dark_mode').click()"
    )
    await page.wait("document.body.classList.contains('body--dark')")
    await page.type(".cb-input textarea", "can you read me")
    text = await _luminance(page, ".cb-input textarea", "color")
    box = await _luminance(page, ".cb-composer", "backgroundColor")
    assert text > 0.5 and box < 0.1, (text, box)  # light text on a dark box
    assert await _luminance(page, ".q-header", "backgroundColor") < 0.1
    strip = await page.eval("getComputedStyle(document.querySelector('.cb-composer-strip')).backgroundImage")
    assert "18, 19, 24" in strip, strip  # the dark page colour, not the light one
    await page.screenshot("chat-dark")
    await page.goto(echo_url + "/")  # a reload keeps the mode
    await page.wait("document.body.classList.contains('body--dark')")
    await page.eval(
        "[...document.querySelectorAll('button')].find(b => b.innerText.trim() === 'dark_mode').click()"
    )
    await page.wait("!document.body.classList.contains('body--dark')")


async def test_a_phone_sees_the_whole_nav_and_table_and_toasts_clear_the_input(
    page: Page, echo_url: str
) -> None:
    await page.send(
        "Emulation.setDeviceMetricsOverride", width=390, height=800, deviceScaleFactor=1, mobile=True
    )
    try:
        await page.goto(echo_url + "/")
        await _phone_screenshot(page, "phone")
        nav = await page.eval(
            "[...document.querySelectorAll('.cb-nav .q-btn')].map(b => b.getBoundingClientRect().right)"
        )
        assert len(nav) == 7 and max(nav) <= 390, nav  # "Usage" too
        wide = await page.eval(WIDER_THAN_SCREEN)
        assert not wide, wide
        await page.type(".cb-input textarea", "copy me please")
        await page.click(".cb-send")
        await page.wait("[...document.querySelectorAll('.cb-stats')].length > 0", timeout=60)
        await page.eval(
            "[...document.querySelectorAll('button')].find(b => b.innerText.trim().startsWith('content_copy')).click()"
        )
        await page.wait("!!document.querySelector('.q-notification')")
        await asyncio.sleep(1.0)  # it has slid in
        toast = await page.eval("document.querySelector('.q-notification').getBoundingClientRect().bottom")
        composer = await page.eval("document.querySelector('.cb-composer').getBoundingClientRect().top")
        assert toast <= composer, (toast, composer)
        await page.goto(echo_url + "/leaderboard")
        await page.wait("document.body.innerText.includes('No battles yet')")
        await asyncio.sleep(1.5)  # the first refresh has run
        shown = await page.eval(
            "[...document.querySelectorAll('.q-table__bottom--nodata, .cb-table-wrap')].filter(e => e.offsetParent).length"
        )
        assert shown == 0  # one empty state, not an empty table (and charts) as well
        wide = await page.eval(WIDER_THAN_SCREEN)
        assert not wide, wide
    finally:
        await page.send("Emulation.clearDeviceMetricsOverride")


async def test_code_blocks_get_a_copy_button_that_copies_the_code(page: Page, echo_url: str) -> None:
    origin = echo_url
    await page.send(
        "Browser.grantPermissions",
        origin=origin,
        permissions=["clipboardReadWrite", "clipboardSanitizedWrite"],
    )
    await page.send("Emulation.setFocusEmulationEnabled", enabled=True)  # the clipboard wants a focused page
    await page.goto(echo_url + "/")
    # The echo node cannot write a code block (it answers word by word), so one is rendered into an
    # answer's Markdown the way NiceGUI renders it; the page script must find it and add its button.
    await page.eval(
        """(() => {
            const answer = document.createElement('div');
            answer.className = 'cb-answer';
            answer.innerHTML = '<div class="nicegui-markdown"><pre><code>print(42)</code></pre></div>';
            document.querySelector('.q-page').appendChild(answer);
            return true;
        })()"""
    )
    await page.wait("!!document.querySelector('.cb-answer .cb-code-copy')", timeout=10)
    await page.eval("document.querySelector('.cb-answer .cb-code-copy').click()")
    await page.wait("document.querySelector('.cb-answer .cb-code-copy').innerText === 'Copied'")
    copied = await page.eval("navigator.clipboard.readText()")
    assert copied.strip() == "print(42)"
