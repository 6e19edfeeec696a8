"""The log as FastChat's conversation-log JSONL, so FastChat's own analysis scripts can read it.

FastChat writes one JSON object a line: `{"type": "chat", "model", "gen_params", "start", "finish",
"state", "ip", "tstamp"}` for an answer, `{"type": "upvote"|..., "model", "state"}` for a vote on one
answer and `{"type": "leftvote"|..., "models", "states"}` for a battle, where `state` is
`{"conv_id", "model_name", "template_name", "system_message", "roles", "messages", "offset"}` and an
anonymous battle's `models` are empty strings (the names live in the states), as in FastChat.
"""

from __future__ import annotations

import json
from typing import IO, Any

from bus import ChatLog, ChatMessage, ConvState, LogRecord, VoteLog

__all__ = ["fastchat_record", "fastchat_state", "write_jsonl"]


def fastchat_state(conv_id: str, model: str, messages: list[ChatMessage]) -> dict[str, Any]:
    system = "".join(m.content for m in messages if m.role == "system")
    turns = [[m.role, m.content] for m in messages if m.role != "system"]
    return {
        "conv_id": conv_id,
        "model_name": model,
        "template_name": "chatbus",
        "system_message": system,
        "roles": ["user", "assistant"],
        "messages": turns,
        "offset": 0,
    }


def _state(s: ConvState) -> dict[str, Any]:
    return fastchat_state(s.conv_id, s.model, s.messages)


def fastchat_record(record: LogRecord) -> dict[str, Any]:
    if isinstance(record, ChatLog):
        p = record.params
        return {
            "tstamp": round(record.finish, 4),
            "type": "chat",
            "model": record.model,
            "gen_params": {"temperature": p.temperature, "top_p": p.top_p, "max_new_tokens": p.max_tokens},
            "start": round(record.start, 4),
            "finish": round(record.finish, 4),
            "state": fastchat_state(record.conv_id, record.model, record.messages),
            "ip": "",
            # chatbus extras (FastChat's readers ignore unknown keys)
            "mode": record.mode,
            "finish_reason": record.finish_reason,
            "usage": {
                "prompt_tokens": record.usage.prompt_tokens,
                "completion_tokens": record.usage.completion_tokens,
            },
            "node_id": record.node_id,
            "user": record.user,
            "battle_id": record.battle_id,
        }
    assert isinstance(record, VoteLog)
    out: dict[str, Any] = {"tstamp": round(record.tstamp, 4), "type": record.kind}
    if len(record.states) == 1:
        out["model"] = record.models[0]
        out["state"] = _state(record.states[0])
    else:
        out["models"] = ["", ""] if record.anonymous else list(record.models)
        out["states"] = [_state(s) for s in record.states]
    out.update(
        ip="",
        mode=record.mode,
        anony=record.anonymous,
        leaked_identity=record.leaked_identity,
        user=record.user,
        battle_id=record.battle_id,
    )
    return out


def write_jsonl(records: list[LogRecord], out: IO[str]) -> int:
    for r in records:
        out.write(json.dumps(fastchat_record(r), ensure_ascii=False) + "\n")
    return len(records)
