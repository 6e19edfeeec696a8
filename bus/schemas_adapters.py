"""Wire messages of the adapters family: load, unload and list the LoRA adapters a node serves.

A client asks one node on `subjects.adapters(node_id)` (core request/reply); the node answers an
`AdapterReply` listing what it serves afterwards, or a `Rejected` (bus/schemas.py) saying why not.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from bus.schemas import Rejected, _Tagged, _Wire

__all__ = ["ADAPTER_TIMEOUT_S", "AdapterAnswer", "AdapterCommand", "AdapterReply", "AdapterState"]

ADAPTER_TIMEOUT_S = 120.0  # a load fetches from the Object Store and reads the weights


class AdapterCommand(_Tagged, frozen=True, kw_only=True, tag="adapter.command"):
    """`load` `ref` (a train job id, a `models/<digest>` artifact, or a PEFT dir on the node's machine)
    as `name` (default: the name the train job gave it, else the dir's name); `unload` `name`; `list`."""

    action: Literal["load", "unload", "list"]
    ref: str = ""
    name: str = ""


class AdapterState(_Wire, frozen=True, kw_only=True):
    name: str
    base: str
    source: str = ""  # the ref it was loaded from
    rank: int = 0
    mib: float = 0.0  # its weights
    running: int = 0  # requests using it now
    idle_s: float = 0.0  # since a request last used it
    unloading: bool = False  # no new requests; goes when its running ones finish


class AdapterReply(_Tagged, frozen=True, kw_only=True, tag="adapter.reply"):
    node_id: str
    base: str  # the node's base model
    message: str = ""  # what was done
    adapters: list[AdapterState] = msgspec.field(default_factory=list)  # served after the command
    max_adapters: int = 0


AdapterAnswer = AdapterReply | Rejected
