"""The one codec: msgspec JSON for every message on the bus, and the one wire-version check."""

from __future__ import annotations

from typing import Any, TypeVar, overload

import msgspec

from bus.errors import BadMessage
from bus.schemas import WIRE_VERSION

__all__ = ["decode", "encode"]

T = TypeVar("T")

_encoder = msgspec.json.Encoder()
_decoders: dict[Any, msgspec.json.Decoder[Any]] = {}


class _Envelope(msgspec.Struct):
    """Just enough of any message to say what it is, when it does not decode as what we expect."""

    type: str = "?"
    v: int = WIRE_VERSION


_envelope = msgspec.json.Decoder(_Envelope)


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)


@overload
def decode(data: bytes, type_: type[T]) -> T: ...
@overload
def decode(data: bytes, type_: Any) -> Any: ...
def decode(data: bytes, type_: Any) -> Any:
    """Decode `data` as `type_` (a struct or a union of tagged structs).

    Raises BadMessage for what does not decode, and for a message of a newer wire version than this
    release speaks (with a message saying so, even when the newer message no longer decodes).
    """
    decoder = _decoders.get(type_)
    if decoder is None:
        decoder = _decoders[type_] = msgspec.json.Decoder(type_)
    try:
        message = decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        try:
            envelope = _envelope.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            envelope = _Envelope()
        if envelope.v > WIRE_VERSION:
            raise _too_new(envelope.v, envelope.type) from e
        raise BadMessage(f"undecodable {getattr(type_, '__name__', type_)}: {e}") from e
    v = getattr(message, "v", WIRE_VERSION)
    if v > WIRE_VERSION:
        config = getattr(message, "__struct_config__", None)
        raise _too_new(v, getattr(config, "tag", None) or type(message).__name__)
    return message


def _too_new(v: int, kind: str) -> BadMessage:
    return BadMessage(
        f"unsupported message version {v} ({kind!r}): this release speaks chatbus wire version "
        f"{WIRE_VERSION}; upgrade it or send version {WIRE_VERSION}"
    )
