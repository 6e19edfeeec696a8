"""Web app page logic with NiceGUI's simulated user, a real nats-server and scripted nodes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from fakes import EchoEngine
from fakes import echo_node as running_node
from nicegui import ElementFilter, app, ui
from nicegui.storage import Storage
from nicegui.testing import User
from nicegui.testing.user_simulation import user_simulation
from procs import eventually

from bus import BusClient
from bus.schemas import ChatMessage
from bus.schemas_logs import ChatLog, ConvState, VoteLog
from webui.app import build_root
from webui.config import Limits, WebConfig
from webui.services import Services

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def nicegui_storage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Keep NiceGUI's session files in a temp dir, not in the repo."""
    old = Storage.path
    Storage.path = tmp_path_factory.mktemp("nicegui")
    app.storage = Storage()
    yield
    Storage.path = old


@pytest.fixture(scope="module")
async def services(nats_url: str, client: BusClient) -> AsyncIterator[Services]:
    config = WebConfig(nats=nats_url, limits=Limits(user_per_minute=1000), default_max_tokens=64)
    s = await Services.start(config, client=client)
    async with (
        running_node(nats_url, EchoEngine("echo-one", step_s=0.01)),
        running_node(nats_url, EchoEngine("echo-two", step_s=0.01)),
    ):
        await eventually(lambda: {"echo-one", "echo-two"} <= set(client.models()))
        yield s
    await s.close()


@contextlib.asynccontextmanager
async def simulated(services: Services) -> AsyncIterator[User]:
    async with user_simulation(root=build_root(lambda: services)) as user:
        yield user


async def chat_records(services: Services) -> list[ChatLog]:
    return [r async for r in services.client.read_logs() if isinstance(r, ChatLog)]


async def last_chat(services: Services, check: Callable[[ChatLog], bool], timeout: float = 30.0) -> ChatLog:
    """The newest stored chat record, once it passes `check`: the app stores it after the answer shows,
    so a test that reads the log right after the page changed must wait for it."""
    records: list[ChatLog] = []
    for _ in range(int(timeout / 0.1)):
        records = await chat_records(services)
        if records and check(records[-1]):
            return records[-1]
        await asyncio.sleep(0.1)
    raise AssertionError(f"no such chat record in {timeout:g} s; the newest: {records[-1:]}")


async def vote_records(services: Services) -> list[VoteLog]:
    return [r async for r in services.client.read_logs() if isinstance(r, VoteLog)]


async def test_chat_streams_answer_logs_it_and_survives_reload(services: Services) -> None:
    async with simulated(services) as user:
        await user.open("/")
        await user.should_see("What can I help with?")
        user.find(marker="chat-input").type("hello streaming world")
        user.find(marker="send").click()
        await user.should_see("hello streaming world", retries=60)
        await eventually(lambda: "streaming world" in _markdown(user))
        last = await last_chat(services, lambda r: r.messages[-1].content == "hello streaming world")
        assert last.mode == "chat" and last.finish_reason == "stop"
        # Reload: the conversation is still there (per browser session).
        await user.open("/")
        await user.should_see("hello streaming world")
        await user.should_not_see("What can I help with?")
        # Vote on the answer: it lands in the durable log.
        user.find(marker="upvote-1").click()
        await user.should_see("Thanks for the upvote!")
        await eventually(lambda: any(v.kind == "upvote" for v in services.logs.votes()))
        vote = next(v for v in services.logs.votes() if v.kind == "upvote")
        assert vote.mode == "chat" and vote.states[0].messages[-1].role == "assistant"
        # Clear starts over.
        user.find(marker="clear").click()
        await user.should_see("What can I help with?")


def visible(user: User, marker: str) -> bool:
    with user:
        return any(el.visible for el in ElementFilter(marker=marker))


def _markdown(user: User) -> str:
    """The text of every Markdown element on the page (the answers), '' when there is none."""
    try:
        return " ".join(el.content for el in user.find(ui.markdown).elements)
    except AssertionError:
        return ""


async def test_stop_keeps_the_text_so_far_and_regenerate_answers_again(
    services: Services, nats_url: str
) -> None:
    async with running_node(nats_url, EchoEngine("echo-slow", step_s=0.05)):
        await eventually(lambda: "echo-slow" in services.model_names())
        async with simulated(services) as user:
            await user.open("/")
            user.find(marker="clear").click()
            with user:
                select = next(iter(ElementFilter(kind=ui.select)))
            select.set_value("echo-slow")
            user.find(marker="chat-input").type(" ".join(f"w{i}" for i in range(300)))
            user.find(marker="send").click()
            await eventually(lambda: "w3" in _markdown(user))
            user.find(marker="send").click()  # the send button is the stop button while answering
            await user.should_see("stopped", retries=60)
            last = await last_chat(services, lambda r: r.model == "echo-slow")
            assert last.finish_reason == "cancelled"
            assert 0 < len(last.messages[-1].content.split()) < 300
            select.set_value("echo-one")
            user.find(marker="regenerate").click()
            await eventually(lambda: "w63" in _markdown(user), timeout=20)  # max_tokens is 64
            again = await last_chat(services, lambda r: r.model == "echo-one")
            assert again.conv_id == last.conv_id
            assert again.finish_reason == "length"


async def test_input_length_and_rate_limits_say_what_to_do(services: Services) -> None:
    async with simulated(services) as user:
        await user.open("/")
        user.find(marker="chat-input").type("x" * (services.config.limits.max_input_chars + 1))
        user.find(marker="send").click()
        await user.should_see("the limit is")
    tight = Services(
        WebConfig(nats="", limits=Limits(user_per_minute=1)), services.client, services.logs, services.limiter
    )
    from webui.limits import RateLimiter

    tight.limiter = RateLimiter(tight.config.limits)
    async with simulated(tight) as user:
        await user.open("/")
        for _ in range(2):
            user.find(marker="chat-input").type("one two")
            user.find(marker="send").click()
            await asyncio.sleep(0.3)
        await user.should_see("too fast", retries=40)


async def test_arena_battle_vote_reveals_names_and_moves_leaderboard(services: Services) -> None:
    async with simulated(services) as user:
        await user.open("/arena")
        await user.should_see("Model A")
        user.find(marker="chat-input").type("apples and pears")
        user.find(marker="send").click()
        await eventually(lambda: visible(user, "vote-row"), timeout=20)
        user.find(marker="leftvote").click()
        await user.should_see("You voted: A is better", retries=40)
        await user.should_see("Model A was echo-")
        await eventually(lambda: any(v.mode == "arena" for v in services.logs.votes()))
        vote = next(v for v in services.logs.votes() if v.mode == "arena")
        assert vote.kind == "leftvote" and vote.anonymous and not vote.leaked_identity
        assert sorted(vote.models) == ["echo-one", "echo-two"]
        await user.open("/leaderboard")
        await user.should_see(marker="ratings", retries=40)
        table = user.find(marker="ratings").elements.pop()
        await eventually(lambda: len(table.rows) == 2)
        assert table.rows[0]["model"] == vote.models[0]  # the winner leads
        assert table.rows[0]["battles"] == 1 and table.rows[0]["record"] == "1 / 0 / 0"


async def test_side_by_side_answers_both_and_logs_named_vote(services: Services) -> None:
    async with simulated(services) as user:
        await user.open("/side-by-side")
        user.find(marker="chat-input").type("left right center")
        user.find(marker="send").click()
        await eventually(lambda: visible(user, "vote-row"), timeout=20)
        user.find(marker="tievote").click()
        await user.should_see("You voted: Tie", retries=40)
        await eventually(lambda: any(v.mode == "side_by_side" for v in services.logs.votes()))
        vote = next(v for v in services.logs.votes() if v.mode == "side_by_side")
        assert vote.kind == "tievote" and not vote.anonymous
        assert all(s.messages[-1].content == "left right center" for s in vote.states)


async def test_nodes_page_lists_live_nodes(services: Services, nats_url: str) -> None:
    async with simulated(services) as user:
        await user.open("/nodes")
        await user.should_see("echo-one")
        async with running_node(nats_url, EchoEngine("echo-three")) as node:
            await user.should_see(node.node_id, retries=60)
        await user.should_not_see(node.node_id, retries=60)


async def test_export_logs_writes_fastchat_jsonl(services: Services, nats_url: str, tmp_path: Path) -> None:
    """Exports records this test logs itself (a chat, its upvote, an anonymous battle), whatever else is there."""
    turn = [ChatMessage(role="user", content="export me"), ChatMessage(role="assistant", content="exported")]
    sides = [ConvState(conv_id=f"x-{side}", model=f"echo-{side}", messages=turn) for side in ("one", "two")]
    mine = [
        ChatLog(conv_id="x-chat", model="echo-one", messages=turn, start=1.0, finish=2.0),
        VoteLog(kind="upvote", tstamp=3.0, mode="chat", models=["echo-one"], states=sides[:1], battle_id="x-up"),
        VoteLog(
            kind="leftvote", tstamp=4.0, mode="arena", models=["echo-one", "echo-two"], states=sides,
            anonymous=True, battle_id="x-battle",
        ),
    ]  # fmt: skip
    for record in mine:
        assert await services.logs.append(record)
    out = tmp_path / "logs.jsonl"
    argv = [sys.executable, "-m", "chatbus", "export-logs", "--nats", nats_url, "-o", str(out)]
    proc = await asyncio.to_thread(subprocess.run, argv, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    chat = next(r for r in rows if r["type"] == "chat" and r["state"]["conv_id"] == "x-chat")
    assert chat["state"]["messages"][-1] == ["assistant", "exported"] and "gen_params" in chat
    upvote = next(r for r in rows if r.get("battle_id") == "x-up")
    assert upvote["type"] == "upvote" and upvote["model"] == "echo-one"
    battle = next(r for r in rows if r.get("battle_id") == "x-battle")
    assert battle["type"] == "leftvote" and battle["models"] == ["", ""]  # anonymous: names only in states
    assert [s["model_name"] for s in battle["states"]] == ["echo-one", "echo-two"]


def test_rate_limiter_buckets_refill_and_name_the_limit() -> None:
    from webui.limits import LimitExceeded, RateLimiter

    now = [0.0]
    limiter = RateLimiter(Limits(user_per_minute=100, model_per_minute=2), clock=lambda: now[0])
    limiter.acquire("u1", ["m"])
    limiter.acquire("u2", ["m"])
    with pytest.raises(LimitExceeded, match=r"m is busy.*2 answers a minute.*30 s") as e:
        limiter.acquire("u3", ["m"])
    assert e.value.retry_after_s == pytest.approx(30)
    limiter.acquire("u3", ["other"])  # other models are not affected
    now[0] = 30.0
    limiter.acquire("u3", ["m"])  # refilled one request in 30 s
    with pytest.raises(LimitExceeded, match="Type a message"):
        limiter.check_input("   ")
