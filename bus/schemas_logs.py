"""Wire messages of the log family: every chat answer and every vote, kept durably in CB_LOGS.

A `ChatLog` is one answer with the whole conversation that led to it (FastChat logs the whole
state each turn too). A `VoteLog` is one vote or flag on the answers in `states`; for battles
`models` is (left, right). `export-logs` turns both into FastChat's conversation-log JSONL.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from bus.schemas import ChatMessage, SamplingParams, Usage, _Tagged, _Wire

__all__ = ["BATTLE_VOTES", "ChatLog", "ConvState", "LogRecord", "Mode", "VoteKind", "VoteLog"]

Mode = Literal["chat", "side_by_side", "arena"]
VoteKind = Literal["upvote", "downvote", "flag", "leftvote", "rightvote", "tievote", "bothbad_vote"]
BATTLE_VOTES: frozenset[str] = frozenset({"leftvote", "rightvote", "tievote", "bothbad_vote"})


class ConvState(_Wire, frozen=True, kw_only=True):
    """One conversation with one model, as a vote refers to it."""

    conv_id: str
    model: str
    messages: list[ChatMessage]  # the system prompt first, if any


class ChatLog(_Tagged, frozen=True, kw_only=True, tag="log.chat"):
    conv_id: str
    model: str
    messages: list[ChatMessage]  # the whole conversation, ending in this answer
    params: SamplingParams = msgspec.field(default_factory=SamplingParams)
    start: float  # unix seconds
    finish: float
    finish_reason: str = "stop"  # stop | length | cancelled | error
    error: str = ""
    usage: Usage = msgspec.field(default_factory=Usage)
    node_id: str = ""
    mode: Mode = "chat"
    user: str = ""  # a pseudonymous browser id, never an address
    battle_id: str = ""  # side_by_side / arena: both answers of one round share it


class VoteLog(_Tagged, frozen=True, kw_only=True, tag="log.vote"):
    kind: VoteKind
    tstamp: float
    mode: Mode
    models: list[str]  # one model (chat votes) or (left, right)
    states: list[ConvState]
    anonymous: bool = False
    leaked_identity: bool = False  # an answer named a model: kept, but not rated
    battle_id: str = ""
    user: str = ""


LogRecord = ChatLog | VoteLog
