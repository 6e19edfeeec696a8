"""Frozen v1 wire samples must keep decoding: add fields with defaults, never break these."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from bus import schemas, schemas_jobs, schemas_keys, schemas_logs, schemas_metrics
from bus.codec import decode, encode
from bus.errors import BadMessage
from judge.schemas import EvalSpec
from trainer.schemas import TrainSpec

SAMPLES = json.loads((Path(__file__).parent / "wire" / "v1.json").read_text())

TYPES = {
    "gen_request": schemas.GenerateRequest,
    "gen_request_tools": schemas.GenerateRequest,
    "accepted": schemas.GenerateReply,
    "rejected": schemas.GenerateReply,
    "chunk": schemas.StreamEvent,
    "done": schemas.StreamEvent,
    "failed": schemas.StreamEvent,
    "cancel": schemas.ControlMessage,
    "keepalive": schemas.ControlMessage,
    "node_info": schemas.NodeInfo,
    "count_request": schemas.CountRequest,
    "count_reply": schemas.CountReply,
    "embed_request": schemas.EmbedRequest,
    "embed_reply": schemas.EmbedReply,
    "job_submit": schemas_jobs.JobSubmit,
    "job_event": schemas_jobs.JobEvent,
    "node_metrics": schemas_metrics.NodeMetrics,
    "key_record": schemas_keys.KeyRecord,
    "key_usage": schemas_keys.KeyUsage,
    # durable: kept in streams, buckets and stored model dirs for months
    "chat_log": schemas_logs.LogRecord,
    "vote_log": schemas_logs.LogRecord,
    "job_record": schemas_jobs.JobRecord,
    "train_spec": TrainSpec,  # inside JobSubmit.spec and JobRecord.spec
    "eval_spec": EvalSpec,
    "artifact_info": schemas_jobs.ArtifactInfo,  # chatbus.json
}


@pytest.mark.parametrize("name", sorted(TYPES))
def test_v1_sample_decodes_and_round_trips(name: str) -> None:
    raw = json.dumps(SAMPLES[name]).encode()
    message = decode(raw, TYPES[name])
    assert getattr(message, "v", 1) == 1  # specs and chatbus.json ride inside versioned envelopes
    assert json.loads(encode(message)) == SAMPLES[name]


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    sample = dict(SAMPLES["chunk"], some_future_field=42)
    assert decode(json.dumps(sample).encode(), schemas.StreamEvent) == decode(
        json.dumps(SAMPLES["chunk"]).encode(), schemas.StreamEvent
    )


def test_garbage_is_a_typed_error() -> None:
    with pytest.raises(BadMessage):
        decode(b"{not json", schemas.GenerateRequest)
    with pytest.raises(BadMessage):
        decode(b'{"type":"tok.chunk","seq":"x","text":1}', schemas.StreamEvent)


@pytest.mark.parametrize("extra", [{}, {"text": ["a field reshaped in v2"]}])
def test_a_newer_wire_version_is_refused_by_name(extra: dict) -> None:
    newer = dict(SAMPLES["chunk"], v=2, **extra)  # decodable or not: the codec names the version either way
    with pytest.raises(BadMessage, match="unsupported message version 2"):
        decode(json.dumps(newer).encode(), schemas.StreamEvent)


def test_tags_are_unique() -> None:
    tagged = {
        c
        for module in (schemas, schemas_jobs, schemas_keys, schemas_logs, schemas_metrics)
        for c in vars(module).values()
        if isinstance(c, type)
        and issubclass(c, msgspec.Struct)
        and c.__struct_config__.tag is not None
        and not c.__name__.startswith("_")
    }
    tags = [c.__struct_config__.tag for c in tagged]
    assert len(tags) == len(set(tags))
