"""Resumable streams: SSE event ids, and the record on the bus that lets any gateway resume one.

Every SSE event of a streamed answer carries `id: <completion id>:<seq>`: how many bus events of the
answer the client has (one number per choice, comma-separated, when n > 1). A client that lost the
connection sends it back as `Last-Event-ID` to `GET /v1/chat/completions/{id}/stream` (or
`/v1/completions/{id}/stream`) on any gateway, which replays the rest from the token record and
follows the answer live, continuing it on a node if it was cut short. What that takes, the bus
requests and their attempts, is kept in the `cb_resume` KV bucket as long as the tokens are.
"""

from __future__ import annotations

import hashlib
import logging
import re

import msgspec
from starlette.requests import Request

from bus import Attempt, BusClient, ChatStream, GenerateRequest
from gateway.errors import ApiError

__all__ = ["ChoiceRecord", "Recorder", "ResumeRecord", "event_id", "key_of", "load", "resume_point"]

log = logging.getLogger(__name__)

_ID = re.compile(r"^[0-9A-Za-z_\-]{1,100}$")


class ChoiceRecord(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One choice: its bus request, where it went, and what the gateway shows before it."""

    request: GenerateRequest
    attempts: list[Attempt]
    prefix: str = ""  # completions with echo: the prompt
    prompt_tokens: int = 0  # counted in usage (the first choice of each prompt)


class ResumeRecord(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, tag="gw.resume"):
    """Everything a gateway needs to serve the rest of a stream another gateway started.

    Only gateways read it; `v` lets a newer gateway refuse an older record instead of misreading it.
    """

    v: int = 1
    chat: bool
    model: str
    created: int
    choices: list[ChoiceRecord]
    logprobs: bool = False
    include_usage: bool = False
    key: str = ""  # digest of the API key that started it: only that key may resume it


def key_of(request: Request) -> str:
    """A digest of the caller's API key (empty when the gateway has none), never the key itself."""
    if not request.app.state.config.api_keys:
        return ""
    token = request.headers.get("authorization", "").partition(" ")[2].strip()
    return hashlib.sha256(token.encode()).hexdigest()[:32]


def event_id(completion_id: str, seqs: list[int]) -> str:
    return f"{completion_id}:{','.join(map(str, seqs))}"


def resume_point(request: Request, completion_id: str, n: int) -> list[int] | None:
    """Each choice's last event the client has, from `Last-Event-ID` (or `?last_event_id=`);
    None when neither is sent (replay from the start)."""
    value = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    if value is None:
        return None
    head, _, tail = value.strip().rpartition(":")
    try:
        seqs = [int(s) for s in tail.split(",")]
    except ValueError:
        seqs = []
    if head != completion_id or len(seqs) != n or min(seqs) < 0:
        raise ApiError(
            400,
            f"Last-Event-ID {value[:120]!r} is not an event of {completion_id}: send the `id:` of the last "
            f"event you received, as '{completion_id}:<seq>' ({n} comma-separated numbers for n={n})",
            code="invalid_last_event_id",
            param="Last-Event-ID",
        )
    return seqs


async def load(client: BusClient, completion_id: str, prefix: str, key: str) -> ResumeRecord:
    """The record of `completion_id`, or 404 (unknown, expired, another endpoint's or another key's)."""
    rid = completion_id.removeprefix(prefix)
    data = None
    if completion_id.startswith(prefix) and _ID.match(rid):
        data = await client.get_resume_record(rid)
    record = None
    if data is not None:
        try:
            record = msgspec.json.decode(data, type=ResumeRecord)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            log.warning("unreadable resume record %s: %s", rid, e)
    if record is None or record.key != key or record.v != 1:
        raise ApiError(
            404,
            f"no resumable stream {completion_id[:120]!r}: streams can be resumed for 10 minutes, "
            f"with the API key that started them",
            code="resume_not_found",
        )
    return record


class Recorder:
    """Keeps the record of one streamed answer on the bus, up to date with its attempts."""

    def __init__(self, client: BusClient, key: str, record: ResumeRecord, streams: list[ChatStream]) -> None:
        self._client = client
        self._key = key
        self._record = record
        self._streams = streams
        self._seen = [len(s.attempts) for s in streams]
        self._failed = False

    async def save(self) -> None:
        choices = [
            msgspec.structs.replace(c, attempts=s.attempts)
            for c, s in zip(self._record.choices, self._streams, strict=True)
        ]
        self._record = msgspec.structs.replace(self._record, choices=choices)
        try:
            await self._client.put_resume_record(self._key, msgspec.json.encode(self._record))
            self._failed = False
        except Exception as e:  # the answer still streams; only a resume of it will not work
            if not self._failed:
                log.warning("cannot keep the resume record of %s: %r", self._key, e)
            self._failed = True

    async def sync(self) -> None:
        """Save again when an answer moved to another attempt (before the client sees its events)."""
        seen = [len(s.attempts) for s in self._streams]
        if seen != self._seen or self._failed:  # a save the bus refused (an election) is retried
            self._seen = seen
            await self.save()
