"""The one codec: msgspec JSON for every message on the bus."""

from __future__ import annotations

from typing import Any, TypeVar, overload

import msgspec

from bus.errors import BadMessage

__all__ = ["decode", "encode"]

T = TypeVar("T")

_encoder = msgspec.json.Encoder()
_decoders: dict[Any, msgspec.json.Decoder[Any]] = {}


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)


@overload
def decode(data: bytes, type_: type[T]) -> T: ...
@overload
def decode(data: bytes, type_: Any) -> Any: ...
def decode(data: bytes, type_: Any) -> Any:
    """Decode `data` as `type_` (a struct or a union of tagged structs)."""
    decoder = _decoders.get(type_)
    if decoder is None:
        decoder = _decoders[type_] = msgspec.json.Decoder(type_)
    try:
        return decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise BadMessage(f"undecodable {getattr(type_, '__name__', type_)}: {e}") from e
