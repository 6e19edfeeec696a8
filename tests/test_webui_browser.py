"""The web app end to end in headless Chromium: a running `python -m webui`, a real nats-server and
two real nodes (the default model under two names). Chromium is driven through the DevTools protocol
directly (aiohttp's websocket client), so nothing beyond Debian's `chromium` package is needed.

Set CHATBUS_SCREENSHOTS=1 to (re)write the screenshots in docs/img.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import aiohttp
import pytest
from procs import eventually, node_process, stop, wait_until

from bus import BusClient
from bus.schemas_logs import ChatLog, VoteLog

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DOCS_IMG = ROOT / "docs" / "img"

if CHROMIUM is None:  # ./dev test installs it: a missing browser is a broken setup, not a skip
    pytest.fail("chromium is missing: ./dev test installs it (apt-get install chromium)", pytrace=False)

pytestmark = pytest.mark.model


class Page:
    """One Chromium tab over the DevTools protocol: navigate, evaluate, type, screenshot."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._ids = itertools.count(1)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        msg_id = next(self._ids)
        await self._ws.send_str(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            reply = json.loads((await asyncio.wait_for(self._ws.receive(), 30)).data)
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    async def eval(self, expression: str) -> Any:
        result = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait(self, expression: str, timeout: float = 60.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(RuntimeError):
                value = await self.eval(expression)
                if value:
                    return value
            await asyncio.sleep(0.2)
        text = await self.eval("document.body.innerText")
        raise AssertionError(f"timed out waiting for {expression!r}; the page says:\n{text}")

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", url=url)
        await self.wait(
            "document.readyState === 'complete' && !!document.querySelector('.nicegui-sub-pages')"
        )
        await asyncio.sleep(0.5)  # the socket connects and the page settles

    async def type(self, selector: str, text: str) -> None:
        await self.wait(f"!!document.querySelector({json.dumps(selector)})")
        await self.eval(f"document.querySelector({json.dumps(selector)}).focus()")
        await self.send("Input.insertText", text=text)

    async def click(self, selector: str) -> None:
        await self.wait(f"!!document.querySelector({json.dumps(selector)})")
        await self.eval(f"document.querySelector({json.dumps(selector)}).click()")

    async def click_text(self, text: str, timeout: float = 60.0) -> None:
        js = f"[...document.querySelectorAll('button')].find(b => b.offsetParent && b.innerText.includes({json.dumps(text)}))"
        await self.wait(f"!!{js}", timeout)
        await self.eval(f"{js}.click()")

    async def text(self) -> str:
        return str(await self.eval("document.body.innerText"))

    async def screenshot(self, name: str) -> None:
        if not os.environ.get("CHATBUS_SCREENSHOTS"):
            return
        await asyncio.sleep(1.0)  # charts animate in
        height = int(await self.eval("document.documentElement.scrollHeight"))
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            width=1280,
            height=max(860, height),
            deviceScaleFactor=1,
            mobile=False,
        )
        data = await self.send("Page.captureScreenshot", format="png")
        await self.send("Emulation.clearDeviceMetricsOverride")
        DOCS_IMG.mkdir(parents=True, exist_ok=True)
        (DOCS_IMG / f"{name}.png").write_bytes(base64.b64decode(data["data"]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_ok(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


@contextlib.contextmanager
def webui_process(nats_url: str, port: int, state: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    # Not through procs.spawn: NiceGUI must not see pytest's environment (it would pick its test port).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "NICEGUI_"))}
    argv = [sys.executable, "-m", "webui", "--nats", nats_url, "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--state-dir", str(state), "--max-tokens", "16"]
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
            env=env,
            start_new_session=True,
        )
    try:
        wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/nodes"), timeout=60, proc=proc, log=log)
        yield proc
    finally:
        stop(proc)


MAX_BATTLES = 4  # an answer that names a model makes a battle unrated; four in a row is rare


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("webui-e2e")


@pytest.fixture(scope="module")
def nodes(nats_url: str, workdir: Path, model_cache: Path) -> Iterator[None]:
    # One torch thread per node: two nodes on a small shared machine otherwise fight over cores.
    with (
        mock.patch.dict(os.environ, {"OMP_NUM_THREADS": "1"}),
        node_process(nats_url, workdir / "red.log", name="arena-red", extra=["--node-id", "web-red"]),
        node_process(nats_url, workdir / "blue.log", name="arena-blue", extra=["--node-id", "web-blue"]),
    ):
        yield


@pytest.fixture(scope="module")
async def app_url(nats_url: str, client: BusClient, nodes: None, workdir: Path) -> AsyncIterator[str]:
    await eventually(
        lambda: {"arena-red", "arena-blue"} <= set(client.models()), 120, what="the two real nodes"
    )
    port = free_port()
    with webui_process(nats_url, port, workdir / "state", workdir / "webui.log"):
        yield f"http://127.0.0.1:{port}"


def launch_chromium(profile: str) -> subprocess.Popen[bytes]:
    argv = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--remote-debugging-port=0", "--remote-allow-origins=*", f"--user-data-dir={profile}",
        "--window-size=1280,860", "--hide-scrollbars", "about:blank",
    ]  # fmt: skip
    return subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )


@pytest.fixture(scope="module")
async def page(workdir: Path) -> AsyncIterator[Page]:
    profile = tempfile.mkdtemp(prefix="chromium-", dir=workdir)
    proc = launch_chromium(profile)
    try:
        port_file = Path(profile) / "DevToolsActivePort"
        wait_until(port_file.exists, timeout=30, proc=proc)
        await asyncio.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        async with aiohttp.ClientSession() as session:
            targets = await (await session.get(f"http://127.0.0.1:{port}/json/list")).json()
            target = next(t for t in targets if t["type"] == "page")
            async with session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                p = Page(ws)
                await p.send("Page.enable")
                yield p
    finally:
        stop(proc, timeout=5)


async def votes(client: BusClient) -> list[VoteLog]:
    return [r async for r in client.read_logs() if isinstance(r, VoteLog)]


async def test_chat_streams_an_answer_from_a_real_model(page: Page, app_url: str) -> None:
    await page.goto(app_url + "/")
    await page.wait("document.body.innerText.includes('arena-')")  # the live model picker has models
    await page.type(".cb-input textarea", "What is the capital of France?")
    await page.click(".cb-send")
    await page.wait("document.querySelectorAll('.cb-answer').length >= 1")
    answer = await page.wait(
        "!document.querySelector('.cb-cursor') && document.querySelector('.cb-answer .nicegui-markdown')?.innerText",
        timeout=300,
    )
    assert answer.strip(), "the answer is empty"
    await page.screenshot("chat")
    # A reload keeps the conversation (per browser session).
    await page.goto(app_url + "/")
    await page.wait("document.body.innerText.includes('What is the capital of France?')")
    assert answer.strip()[:20] in await page.text()


async def test_arena_battle_vote_is_logged_and_moves_the_leaderboard(
    page: Page, app_url: str, client: BusClient, workdir: Path, nats_url: str
) -> None:
    """Both sides are SmolLM2, so an answer may name it: such a battle is logged but not rated (checked
    too), and the test fights another battle, up to MAX_BATTLES, until one is rated and moves the board."""
    await page.goto(app_url + "/arena")
    for battle in range(1, MAX_BATTLES + 1):
        if battle > 1:
            await page.click_text("New battle")
            await page.wait("!document.querySelector('.cb-input textarea').disabled")
        await page.type(".cb-input textarea", "What is 2 + 2?")
        await page.click(".cb-send")
        await page.click_text("A is better", timeout=300)  # shown once both answers are done
        verdict = await page.wait(
            "[...document.querySelectorAll('.q-page *')].map(e => e.innerText).find(t => t && t.startsWith('You voted'))",
            timeout=120,
        )
        assert "Model A was arena-" in verdict
        logged = [v for v in await votes(client) if v.mode == "arena"]
        assert len(logged) == battle and logged[-1].kind == "leftvote" and logged[-1].anonymous
        if not logged[-1].leaked_identity:
            break
        assert "won't count toward the ratings" in verdict
    else:
        pytest.fail(f"all {MAX_BATTLES} battles named a model; none could be rated")
    await page.screenshot("arena")
    winner = logged[-1].models[0]
    await page.goto(app_url + "/leaderboard")
    await page.wait(f"document.querySelector('.q-table')?.innerText.includes({json.dumps(winner)})")
    first_row = await page.eval("document.querySelector('.q-table tbody tr').innerText")
    assert winner in first_row
    await page.screenshot("leaderboard")


async def test_side_by_side_answers_in_parallel(page: Page, app_url: str, client: BusClient) -> None:
    await page.goto(app_url + "/side-by-side")
    await page.type(".cb-input textarea", "Name a color.")
    await page.click(".cb-send")
    await page.click_text("Tie", timeout=300)
    await page.wait("document.body.innerText.includes('You voted: Tie')")
    await page.screenshot("side-by-side")
    assert any(v.mode == "side_by_side" and v.kind == "tievote" for v in await votes(client))


async def test_nodes_page_shows_a_node_start_and_stop(
    page: Page, app_url: str, nats_url: str, workdir: Path
) -> None:
    await page.goto(app_url + "/nodes")
    await page.wait(
        "document.body.innerText.includes('web-red') && document.body.innerText.includes('web-blue')"
    )
    with node_process(nats_url, workdir / "green.log", name="arena-green", extra=["--node-id", "web-green"]):
        await page.wait("document.body.innerText.includes('web-green')", timeout=180)
        await page.screenshot("nodes")
    await page.wait("!document.body.innerText.includes('web-green')", timeout=30)


async def test_votes_survive_a_restart_of_the_web_app(
    page: Page, app_url: str, nats_url: str, workdir: Path, client: BusClient
) -> None:
    rated = [v for v in await votes(client) if v.mode == "arena" and not v.leaked_identity]
    port = free_port()
    with webui_process(nats_url, port, workdir / "state", workdir / "webui2.log"):
        await page.goto(f"http://127.0.0.1:{port}/leaderboard")
        await page.wait(f"document.querySelector('.cb-stat-rated')?.innerText === '{len(rated)}'")
        await page.wait(
            f"document.querySelector('.cb-stat-votes')?.innerText === '{len(await votes(client))}'"
        )


async def test_closing_the_tab_stops_the_answer_on_the_node(
    page: Page, app_url: str, client: BusClient
) -> None:
    prompt = "Write a very long story about a dragon who learns to cook, chapter by chapter."
    await page.goto(app_url + "/")
    await page.wait("document.body.innerText.includes('arena-')")
    # This app runs with --max-tokens 16 (fast tests); this answer must still be running when the tab goes.
    assert await page.eval(
        """(() => {
            const input = [...document.querySelectorAll('input')]
                .find(e => e.closest('.q-field')?.innerText.includes('Max tokens'));
            input.value = '512';
            input.dispatchEvent(new Event('input', {bubbles: true}));
            input.dispatchEvent(new Event('change', {bubbles: true}));
            return true;
        })()"""
    )
    await page.type(".cb-input textarea", prompt)
    await page.click(".cb-send")
    await page.wait("document.querySelector('.cb-cursor') && document.querySelector('.cb-answer')?.innerText")
    left = time.monotonic()
    await page.send("Page.navigate", url="about:blank")  # the tab goes away mid-answer
    for _ in range(300):
        logged = [
            r
            async for r in client.read_logs()
            if isinstance(r, ChatLog) and r.messages[-2].content == prompt and r.finish_reason == "cancelled"
        ]
        if logged:
            break
        await asyncio.sleep(0.2)
    assert logged, "the answer was not stopped when its tab closed"
    assert logged[0].usage.completion_tokens < 512  # cut short, not run to its end
    print(f"answer stopped {time.monotonic() - left:.1f} s after the tab closed")
