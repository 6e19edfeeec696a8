"""The TUI's pure parts: `!!` parsing and completion, conversation files, parameters, the launcher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bus.schemas import ChatMessage
from tui.conversation import Conversation, ConversationFileError
from tui.inchat import Command, CommandError, complete, parse
from tui.launcher import EmbeddedDefaults, is_local, port_of
from tui.settings import parse_param


def test_parse_commands() -> None:
    assert parse("hello") is None and parse("  !not a command") is None
    assert parse("!!exit") == Command("!!exit")
    assert parse(" !!save  my chat.json ") == Command("!!save", "my chat.json")
    assert parse("!!MODEL smol") == Command("!!model", "smol")
    with pytest.raises(CommandError, match="unknown command !!nope; try one of"):
        parse("!!nope")
    with pytest.raises(CommandError, match="!!load needs a FILE"):
        parse("!!load")
    with pytest.raises(CommandError, match="takes no argument"):
        parse("!!reset now")


def test_complete_commands_models_and_files(tmp_path: Path) -> None:
    (tmp_path / "chat-a.json").write_text("{}")
    (tmp_path / "chat-b.json").write_text("{}")
    (tmp_path / "logs").mkdir()
    models = ["smol", "smol-lora", "llama"]
    assert complete("!!e", models, tmp_path) == ("!!exit", ["!!exit"])
    assert complete("!!re", models, tmp_path) == ("!!re", ["!!reset", "!!remove", "!!regen"])
    assert complete("!!sa", models, tmp_path) == ("!!save ", ["!!save"])
    assert complete("!!model sm", models, tmp_path) == ("!!model smol", ["smol", "smol-lora"])
    assert complete("!!model ll", models, tmp_path) == ("!!model llama", ["llama"])
    assert complete("!!load ch", models, tmp_path) == ("!!load chat-", ["chat-a.json", "chat-b.json"])
    assert complete("!!save lo", models, tmp_path) == ("!!save logs/", ["logs/"])
    assert complete("plain text", models, tmp_path) == ("plain text", [])


def test_conversation_turns() -> None:
    conv = Conversation(model="m", system="be nice")
    assert conv.drop_answer() is None and not conv.remove_exchange()
    conv.add_user("q1")
    conv.add_assistant("a1")
    conv.add_user("q2")
    conv.add_assistant("a2")
    assert [m.role for m in conv.request_messages()] == ["system", "user", "assistant", "user", "assistant"]
    assert conv.drop_answer() == "q2" and conv.messages[-1].content == "q2"
    assert conv.remove_exchange() and [m.content for m in conv.messages] == ["q1", "a1"]
    conv.system = "  "
    assert conv.request_messages()[0].role == "user"  # a blank system prompt is not sent


def test_conversation_file_round_trips(tmp_path: Path) -> None:
    conv = Conversation(model="m", system="sys", temperature=0.0, top_p=0.5, max_tokens=None)
    conv.messages = [
        ChatMessage(role="user", content="hé\n```py\nx = 1\n```"),
        ChatMessage(role="assistant", content="ok"),
    ]
    conv.save(tmp_path / "c.json")
    again = Conversation.load(tmp_path / "c.json")
    assert again == conv
    assert again.to_dict() == json.loads((tmp_path / "c.json").read_text())
    # A bare OpenAI-style message list loads too (its system message becomes the system prompt).
    (tmp_path / "o.json").write_text(
        json.dumps([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}])
    )
    loaded = Conversation.load(tmp_path / "o.json")
    assert loaded.system == "s" and loaded.messages == [ChatMessage(role="user", content="u")]


@pytest.mark.parametrize(
    ("content", "error"),
    [
        ("{nope", "is not JSON"),
        ('"text"', "expected a JSON object"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "message 0 needs a role"),
        ('{"params": {"temperature": "hot"}}', "not a chatbus conversation"),
    ],
)
def test_bad_conversation_files_say_why(tmp_path: Path, content: str, error: str) -> None:
    (tmp_path / "bad.json").write_text(content)
    with pytest.raises(ConversationFileError, match=error):
        Conversation.load(tmp_path / "bad.json")
    with pytest.raises(ConversationFileError, match="cannot read"):
        Conversation.load(tmp_path / "missing.json")


def test_parse_param() -> None:
    assert parse_param("temperature", "0") == 0.0 and parse_param("top_p", "0.9") == 0.9
    assert parse_param("max_tokens", "") is None and parse_param("max_tokens", "64") == 64
    for field, raw in (("temperature", "3"), ("top_p", "0"), ("max_tokens", "0"), ("top_p", "x")):
        with pytest.raises(ValueError):
            parse_param(field, raw)


def test_launcher_starts_only_for_loopback(tmp_path: Path) -> None:
    assert is_local("nats://127.0.0.1:4222") and is_local("nats://localhost:5000")
    assert not is_local("nats://nats.example.com:4222")
    assert port_of("nats://127.0.0.1:5123") == 5123 and port_of("nats://127.0.0.1") == 4222
    argv = EmbeddedDefaults(5123, tmp_path).argv()
    assert argv[1:] == [
        "-m",
        "chatbus",
        "up",
        "--no-web",
        "--no-gateway",
        "--nats-port",
        "5123",
        "--state-dir",
        str(tmp_path),
    ]


def test_sampling_problems_name_each_field_and_its_range() -> None:
    """The bus contract's one rule for sampling ranges, at and just past each edge."""
    from bus.schemas import MAX_STOP_STRINGS, SamplingParams

    fine = SamplingParams(
        temperature=2, top_p=1, top_k=0, max_tokens=1, seed=2**63 - 1, repetition_penalty=0.01,
        presence_penalty=-2, frequency_penalty=2, top_logprobs=20, stop=["x"] * MAX_STOP_STRINGS,
    )  # fmt: skip
    assert fine.problems() == [] and SamplingParams(seed=-(2**63)).problems() == []
    bad = {
        "temperature": 2.01, "top_p": 0.0, "top_k": -1, "max_tokens": 0, "seed": 2**63,
        "repetition_penalty": 0.0, "presence_penalty": -2.5, "frequency_penalty": float("nan"),
        "top_logprobs": 21,
    }  # fmt: skip
    for field, value in bad.items():
        problems = SamplingParams(**{field: value}).problems()  # type: ignore[arg-type]
        assert len(problems) == 1 and problems[0].startswith(f"{field} must be"), (field, problems)
    assert SamplingParams(temperature=9).problems() == ["temperature must be between 0 (greedy) and 2, got 9"]
    assert SamplingParams(repetition_penalty=float("inf")).problems()
    many = SamplingParams(stop=["x"] * (MAX_STOP_STRINGS + 1)).problems()
    assert many == [f"at most {MAX_STOP_STRINGS} stop strings, got {MAX_STOP_STRINGS + 1}"]
    assert len(SamplingParams(**bad).problems()) == len(bad)  # type: ignore[arg-type]


def test_saved_file_out_of_range_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "hot.json"
    path.write_text(json.dumps({"params": {"temperature": 9, "repetition_penalty": 1.2}, "messages": []}))
    with pytest.raises(
        ConversationFileError, match=r"hot.json: temperature must be between 0 \(greedy\) and 2"
    ):
        Conversation.load(path)
    path.write_text(json.dumps({"params": {"repetition_penalty": 1.2}, "messages": []}))
    assert Conversation.load(path).params().repetition_penalty == 1.2
