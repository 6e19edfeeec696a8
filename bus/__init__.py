"""The bus contract: wire schemas, subjects, codec, errors, connection and BusClient."""

from bus.client import BusClient
from bus.codec import decode, encode
from bus.connection import connect
from bus.errors import (
    BadRequest,
    BusError,
    BusUnavailable,
    Code,
    ContextLengthExceeded,
    GenerationFailed,
    ModelNotFound,
    NodeBusy,
    NodeTimeout,
    NoNodeAvailable,
)
from bus.nodes import ModelEntry
from bus.prefixes import prefix_hashes
from bus.schemas import ChatMessage, Chunk, Done, Failed, NodeInfo, SamplingParams, StreamEvent, Usage
from bus.server import EmbeddedServer
from bus.stream import ChatStream

__all__ = [
    "BadRequest",
    "BusClient",
    "BusError",
    "BusUnavailable",
    "ChatMessage",
    "ChatStream",
    "Chunk",
    "Code",
    "ContextLengthExceeded",
    "Done",
    "EmbeddedServer",
    "Failed",
    "GenerationFailed",
    "ModelEntry",
    "ModelNotFound",
    "NoNodeAvailable",
    "NodeBusy",
    "NodeInfo",
    "NodeTimeout",
    "SamplingParams",
    "StreamEvent",
    "Usage",
    "connect",
    "decode",
    "encode",
    "prefix_hashes",
]
