"""Prompts too large for one NATS message: stored encrypted in CB_PROMPTS and sent by reference.

A request whose encoding passes the server's `max_payload` keeps its small fields (id, model,
params, continuation, owner) and carries a `PromptRef` in place of its messages, prompt, tools and
constraint. Those are encoded as one `PromptBody`, encrypted with a fresh random key, cut into
chunks under `cb.prompt.<owner>.<name>.<i>` (an asker may write only under its own NATS user,
bus/auth.py), and read back chunk by chunk, by exact subject (a JetStream direct get), by the node
the request reaches. The chunks live as long as the token streams (10 minutes), so a failover or a
resume on another gateway sends the same small reference again.

Why encrypted: nodes read CB_PROMPTS by subject, and nats-server resolves a wildcard in a direct
get's subject to the newest match, so permissions alone cannot keep a node to the prompts sent to
it. The key travels only inside the request, so a node can read only what it was asked to serve.
The cipher is ChaCha20-Poly1305 from `cryptography` (a 256-bit random key per prompt, never reused,
so one fixed nonce; the chunks' name is the associated data): a chunk that was swapped, cut short or
expired fails its tag and becomes a clear error, never a different prompt. The SHA-256 of the plain
body in the reference checks the whole once more after decryption.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NoStreamResponseError, NotFoundError

from bus import subjects
from bus.codec import decode, encode
from bus.connection import TOKENS_MAX_AGE_S, ensure_stream
from bus.errors import BadMessage, BadRequest, BusUnavailable
from bus.schemas import GenerateRequest, PromptBody, PromptRef

__all__ = [
    "HEADROOM",
    "MAX_PROMPT_BYTES",
    "by_reference",
    "ensure_prompts_stream",
    "fetch",
    "fits",
    "store",
]

HEADROOM = 4096  # NATS headers and the reply subject travel with a message's payload
MAX_PROMPT_BYTES = 64 * 1024 * 1024  # a node refuses a reference to more (gateways cap bodies lower)
_READ_RETRY_S = 2.0  # a replica that answers a direct get may lag the leader by a moment
_NONCE = bytes(12)  # each key seals one prompt only
_TAG = 16  # Poly1305's tag, after the ciphertext


def fits(request: GenerateRequest, max_payload: int) -> bool:
    """Whether `request` goes in one message of a server whose limit is `max_payload`."""
    return len(encode(request)) <= max_payload - HEADROOM


def by_reference(request: GenerateRequest, ref: PromptRef) -> GenerateRequest:
    """`request` with its large parts replaced by `ref`."""
    return msgspec.structs.replace(
        request, messages=None, prompt=None, tools=[], constraint=None, prompt_ref=ref
    )


def _seal(key: bytes, name: str, body: bytes) -> bytes:
    return ChaCha20Poly1305(key).encrypt(_NONCE, body, name.encode())


def _open(key: bytes, name: str, secret: bytes) -> bytes | None:
    """The plain body, or None when `secret` is not what `key` sealed under `name`."""
    try:
        return ChaCha20Poly1305(key).decrypt(_NONCE, secret, name.encode())
    except InvalidTag:
        return None


async def ensure_prompts_stream(js: JetStreamContext) -> None:
    await ensure_stream(
        js,
        StreamConfig(
            name=subjects.PROMPTS_STREAM,
            subjects=[subjects.prompts_all()],
            storage=StorageType.FILE,  # as the token record: a resume after a server restart finds it
            retention=RetentionPolicy.LIMITS,
            max_age=TOKENS_MAX_AGE_S,
            max_bytes=1024 * 1024 * 1024,
            allow_direct=True,  # nodes read chunks by subject, and may do nothing else with it
        ),
        disposable=True,
    )


async def store(js: JetStreamContext, request: GenerateRequest, max_payload: int) -> PromptRef:
    """Put the large parts of `request` into the prompts stream; the reference to send instead."""
    body = encode(
        PromptBody(
            messages=request.messages,
            prompt=request.prompt,
            tools=request.tools,
            constraint=request.constraint,
        )
    )
    key = ChaCha20Poly1305.generate_key()
    name = secrets.token_hex(16)
    secret = await asyncio.to_thread(_seal, key, name, body)
    size = max(1024, max_payload - HEADROOM)
    parts = [secret[i : i + size] for i in range(0, len(secret), size)]
    for i, part in enumerate(parts):
        await _publish(js, subjects.prompt_chunk(request.owner, name, i), part)
    return PromptRef(
        name=name, chunks=len(parts), size=len(body), sha256=hashlib.sha256(body).hexdigest(), key=key.hex()
    )


async def _publish(js: JetStreamContext, subject: str, data: bytes) -> None:
    for attempt in range(2):
        try:
            await js.publish(subject, data)
            return
        except (NoRespondersError, NoStreamResponseError):
            if attempt:
                break
            try:  # a server nobody set up (no credentials): make the stream, as nodes make theirs
                await ensure_prompts_stream(js)
            except Exception:
                break
    raise BusUnavailable(
        f"the bus has no {subjects.PROMPTS_STREAM} stream, which carries prompts over one NATS message; "
        f"run `chatbus setup-bus --nats nats://admin:PASSWORD@HOST:PORT` once"
    )


async def fetch(js: JetStreamContext, request: GenerateRequest) -> GenerateRequest:
    """`request` with the parts its reference points at put back (BadRequest when they are gone,
    incomplete or not what the reference says)."""
    ref = request.prompt_ref
    if ref is None:
        return request
    if not (0 < ref.size <= MAX_PROMPT_BYTES and 0 < ref.chunks <= ref.size):
        raise BadRequest(f"a prompt reference of {ref.size} bytes in {ref.chunks} chunks is out of bounds")
    parts = [await _chunk(js, subjects.prompt_chunk(request.owner, ref.name, i)) for i in range(ref.chunks)]
    secret = b"".join(parts)
    try:
        key = bytes.fromhex(ref.key)
    except ValueError:
        key = b""
    if len(secret) != ref.size + _TAG or len(key) != 32:
        raise BadRequest(f"the prompt of request {request.request_id} is incomplete on the bus")
    body = await asyncio.to_thread(_open, key, ref.name, secret)
    if body is None or not hmac.compare_digest(hashlib.sha256(body).hexdigest(), ref.sha256):
        raise BadRequest(f"the prompt of request {request.request_id} on the bus is not the one it refers to")
    try:
        parts_of: PromptBody = decode(body, PromptBody)
    except BadMessage as e:
        raise BadRequest(f"the prompt of request {request.request_id} is unreadable: {e}") from None
    return msgspec.structs.replace(
        request,
        messages=parts_of.messages,
        prompt=parts_of.prompt,
        tools=parts_of.tools,
        constraint=parts_of.constraint,
        prompt_ref=None,
    )


async def _chunk(js: JetStreamContext, subject: str) -> bytes:
    deadline = time.monotonic() + _READ_RETRY_S
    while True:
        try:
            msg = await js.get_msg(subjects.PROMPTS_STREAM, subject=subject, direct=True)
            return msg.data or b""
        except (NotFoundError, NoRespondersError, NatsTimeout) as e:
            if time.monotonic() > deadline:
                raise BadRequest(
                    f"a prompt sent by reference is not on the bus ({type(e).__name__}): prompts over one "
                    f"NATS message are kept {TOKENS_MAX_AGE_S / 60:.0f} minutes"
                ) from None
            await asyncio.sleep(0.1)
