"""Regression tests for the web app bugs a new user hit (issue 18), with NiceGUI's simulated user."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fakes import EchoEngine
from fakes import echo_node as running_node
from nicegui import ElementFilter, ui
from nicegui.testing import User
from nicegui.testing.user_simulation import user_simulation
from procs import eventually
from test_webui import _markdown, chat_records, last_chat, nicegui_storage, services, simulated, visible

from webui.app import build_root
from webui.services import Services

__all__ = ["nicegui_storage", "services"]  # fixtures, imported so that pytest finds them here


def shown(user: User, marker: str) -> bool:
    """Is an element with `marker` on screen: it and every element around it visible?"""
    with user:
        for el in ElementFilter(marker=marker):
            while el is not None and el.visible:
                el = el.parent_slot.parent if el.parent_slot else None
            if el is None:
                return True
    return False


def _marked(user: User, marker: str) -> Any:
    """The element with `marker`, hidden or not (user.find sees visible ones only)."""
    with user:
        return next(iter(ElementFilter(marker=marker)))


def _elements(user: User, kind: type) -> list:
    with user:
        return list(ElementFilter(kind=kind))


async def test_an_empty_leaderboard_shows_one_empty_state(services: Services) -> None:
    async with simulated(services) as user:
        await user.open("/leaderboard")
        await user.should_see("No battles yet")
        await eventually(lambda: shown(user, "no-battles"))
        assert not shown(user, "ratings")  # no empty table, no empty charts beside it


async def test_dark_mode_is_remembered(services: Services) -> None:
    async with simulated(services) as user:
        await user.open("/")
        assert _elements(user, ui.dark_mode)[0].value is False
        user.find(marker="dark-toggle").click()
        assert _elements(user, ui.dark_mode)[0].value is True
        await user.open("/leaderboard")  # a new page load
        assert _elements(user, ui.dark_mode)[0].value is True


async def _ask(user: User, text: str) -> None:
    user.find(marker="chat-input").type(text)
    user.find(marker="send").click()


async def test_a_chat_vote_counts_once_and_answers_show_their_stats(services: Services) -> None:
    async with simulated(services) as user:
        await user.open("/")
        user.find(marker="clear").click()
        await _ask(user, "count my vote once")
        await eventually(lambda: visible(user, "upvote-1"), timeout=60)
        await user.should_see(marker="stats-1")
        stats = user.find(marker="stats-1").elements.pop().text
        assert stats.startswith("4 tokens") and "tok/s" in stats and "node " in stats
        before = len([v for v in services.logs.votes() if v.kind == "upvote"])
        user.find(marker="upvote-1").click()
        await user.should_see("Thanks for the upvote!")
        user.find(marker="upvote-1").click()  # a second click (or a stale button) adds nothing
        user.find(marker="downvote-1").click()
        await eventually(lambda: not services.logs.pending)
        assert len([v for v in services.logs.votes() if v.kind == "upvote"]) == before + 1
        assert not any(v.kind == "downvote" for v in services.logs.votes())
        assert not user.find(marker="upvote-1").elements.pop().enabled


async def test_an_offline_model_gives_the_question_back(services: Services, nats_url: str) -> None:
    async with simulated(services) as user:
        async with running_node(nats_url, EchoEngine("echo-gone")):
            await eventually(lambda: "echo-gone" in services.model_names())
            await user.open("/")
            user.find(marker="clear").click()
            _elements(user, ui.select)[0].set_value("echo-gone")
        await eventually(lambda: "echo-gone" not in services.model_names())
        await _ask(user, "is anyone there")
        await user.should_see(marker="answer-error", retries=60)
        await user.should_see("Your message is back in the input")
        assert user.find(marker="chat-input").elements.pop().value == "is anyone there"
        await user.should_not_see(marker="upvote-1")
        await user.should_see("What can I help with?")  # no failed exchange left in the conversation


async def test_out_of_range_parameters_are_refused_and_repetition_penalty_is_sent(services: Services) -> None:
    async with simulated(services) as user:
        await user.open("/")
        user.find(marker="clear").click()
        _marked(user, "param-temperature").value = 9  # e.g. from an old session
        await _ask(user, "too hot")
        await user.should_see("temperature must be between 0 (greedy) and 2, got 9")
        _marked(user, "param-temperature").value = 0.5
        _marked(user, "param-repetition_penalty").value = 1.3
        await _ask(user, "penalised words")
        await eventually(lambda: "penalised words" in _markdown(user), timeout=60)
        await last_chat(services, lambda r: (r.params.repetition_penalty, r.params.temperature) == (1.3, 0.5))


async def test_side_by_side_clears_the_old_verdict_and_has_no_vote_for_one_model(services: Services) -> None:
    async with simulated(services) as user:
        await user.open("/side-by-side")
        assert not visible(user, "same-model")
        await _ask(user, "first round")
        await eventually(lambda: visible(user, "vote-row"), timeout=60)
        user.find(marker="tievote").click()
        await user.should_see("You voted: Tie")
        await _ask(user, "follow up")
        await eventually(lambda: visible(user, "vote-row"), timeout=60)
        assert user.find(marker="verdict").elements.pop().text == ""
        # Regenerate answers the last question again on both sides.
        chats = len(await chat_records(services))
        user.find(marker="regenerate").click()
        for _ in range(100):
            records = await chat_records(services)
            if len(records) >= chats + 2:
                break
            await asyncio.sleep(0.1)
        assert len(records) == chats + 2 and records[-1].messages[-2].content == "follow up"
        await eventually(lambda: visible(user, "vote-row"), timeout=60)
        # The same model on both sides: said so, and no vote.
        user.find(marker="new-battle").click()
        for select in _elements(user, ui.select):
            select.set_value("echo-one")
        await user.should_see(marker="same-model")
        await _ask(user, "mirror mirror")
        await eventually(lambda: "mirror" in _markdown(user), timeout=60)
        await eventually(lambda: not services.logs.pending)
        assert not visible(user, "vote-row")


class _OneModel(Services):
    def model_names(self) -> list[str]:
        return ["echo-one"]


@contextlib.asynccontextmanager
async def _one_model(services: Services) -> AsyncIterator[User]:
    one = _OneModel(services.config, services.client, services.logs, services.limiter)
    async with user_simulation(root=build_root(lambda: one)) as user:
        yield user


async def test_the_arena_with_one_model_gives_a_command_that_works(services: Services) -> None:
    async with _one_model(services) as user:
        await user.open("/arena")
        await _ask(user, "anyone?")
        await user.should_see("chatbus node --name other-name")
        await user.should_not_see("python -m node")


async def test_votes_beyond_the_hourly_limit_are_refused(services: Services) -> None:
    from webui.config import Limits, WebConfig
    from webui.limits import RateLimiter

    limits = Limits(user_per_minute=1000, votes_per_hour=1)
    one_vote = Services(
        WebConfig(nats="", limits=limits), services.client, services.logs, RateLimiter(limits)
    )
    async with simulated(one_vote) as user:
        await user.open("/arena")
        for round_ in range(2):
            before = len(services.logs.votes())
            await _ask(user, f"round {round_} of votes")
            await eventually(lambda: visible(user, "vote-row"), timeout=60)
            user.find(marker="tievote").click()
            if round_ == 0:
                await user.should_see("You voted: Tie")
                await eventually(lambda n=before + 1: len(services.logs.votes()) == n)
                user.find(marker="new-battle").click()
        await user.should_see("You have reached the limit of 1 vote an hour")
        assert len(services.logs.votes()) == before  # the second vote was not logged
