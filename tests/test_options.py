"""The one way every command finds its bus: --nats, else $CHATBUS_NATS, else a recorded URL, else the default."""

from __future__ import annotations

import os
from pathlib import Path

from bus.paths import DEFAULT_NATS, resolve_nats, write_nats_url
from node.__main__ import parse as parse_node


def test_resolve_nats_takes_the_flag_then_the_environment_then_the_record(tmp_path: Path) -> None:
    env = {"CHATBUS_NATS": "nats://from-env:1"}
    assert resolve_nats("nats://flag:1", env, tmp_path) == "nats://flag:1"
    assert resolve_nats(None, env, tmp_path) == "nats://from-env:1"
    assert resolve_nats(None, {}, tmp_path) == DEFAULT_NATS  # nothing recorded yet
    write_nats_url(tmp_path, "nats://recorded:1")
    assert resolve_nats(None, {}, tmp_path) == "nats://recorded:1"
    assert resolve_nats(None, {}) == DEFAULT_NATS  # a standalone command reads no record


def test_the_node_reads_the_environment_it_is_given_not_the_process_one(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("CHATBUS_NATS", raising=False)
    assert parse_node([], {"CHATBUS_NATS": "nats://given:1"}).nats == "nats://given:1"
    assert "CHATBUS_NATS" not in os.environ
    assert parse_node(["--nats", "nats://flag:1"], {"CHATBUS_NATS": "nats://given:1"}).nats == "nats://flag:1"
    assert parse_node([], {}).nats == DEFAULT_NATS
