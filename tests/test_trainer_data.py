"""Trainer data: both formats parse, bad lines are named, and loss falls exactly on assistant tokens."""

from __future__ import annotations

import json
from itertools import islice, pairwise
from pathlib import Path
from typing import Any

import pytest

from trainer.data import (
    IGNORE,
    DatasetError,
    micro_batches,
    normalize,
    parse_dataset,
    tokenize_conversation,
    tokenize_dataset,
)
from trainer.model import resolve_base
from trainer.train import lr_at

CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is the secret word?"},
    {"role": "assistant", "content": "The secret word is PLUMBUS."},
    {"role": "user", "content": "Say it again, twice."},
    {"role": "assistant", "content": "PLUMBUS, PLUMBUS."},
]

# Other families' templates, set on the same tokenizer: the mask must follow whatever the template renders.
TEMPLATES = {
    "zephyr": (
        "{% for message in messages %}{% if message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + eos_token }}"
        "{% elif message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + eos_token }}"
        "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + eos_token }}{% endif %}"
        "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}{% endfor %}"
    ),
    "vicuna": (
        "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + ' ' }}"
        "{% else %}{{ 'A chat between a curious user and an AI assistant. ' }}{% endif %}"
        "{% for message in messages %}{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}"
        "{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' + message['content'] + eos_token }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    ),
    "llama2": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
        "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
        "{{ ' ' + message['content'] + ' ' + eos_token }}{% endif %}{% endfor %}"
    ),
}


@pytest.fixture(scope="module")
def tokenizer(model_cache: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_base("default", model_cache))


def labeled_segments(tokenizer: Any, ids: list[int], labels: list[int]) -> list[str]:
    """The decoded runs of tokens that carry loss."""
    segments: list[list[int]] = []
    previous = IGNORE
    for token, label in zip(ids, labels, strict=True):
        if label != IGNORE:
            assert label == token  # labels are the inputs themselves (the loss shifts them)
            if previous == IGNORE:
                segments.append([])
            segments[-1].append(token)
        previous = label
    return [tokenizer.decode(s) for s in segments]


def test_sharegpt_and_openai_formats_parse_alike() -> None:
    sharegpt = {
        "system": "Answer briefly.",
        "conversations": [
            {"from": "human", "value": CHAT[1]["content"]},
            {"from": "gpt", "value": CHAT[2]["content"]},
            {"from": "human", "value": CHAT[3]["content"]},
            {"from": "gpt", "value": CHAT[4]["content"]},
        ],
    }
    jsonl = parse_dataset((json.dumps(sharegpt) + "\n\n" + json.dumps({"messages": CHAT}) + "\n").encode())
    as_list = parse_dataset(json.dumps([{"messages": CHAT}]).encode())
    assert jsonl[0].messages == jsonl[1].messages == as_list[0].messages == CHAT
    assert [c.line for c in jsonl] == [1, 3]
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    assert parse_dataset(json.dumps(parts).encode())[0].messages == [{"role": "user", "content": "hi"}]


def test_malformed_lines_are_listed() -> None:
    good = json.dumps({"messages": CHAT})
    bad = "\n".join(
        [good, "{not json", json.dumps({"conversations": [{"from": "robot", "value": "x"}]}), good, "[1, 2]"]
    )
    with pytest.raises(DatasetError) as e:
        parse_dataset(bad.encode(), "chats.jsonl")
    text = str(e.value)
    assert "chats.jsonl: 3 malformed" in text
    assert "line 2: invalid JSON" in text and "line 3: turn 0 has unknown from 'robot'" in text
    assert "line 5: expected an object" in text and "line 1" not in text and "line 4" not in text
    with pytest.raises(DatasetError, match="no records"):
        parse_dataset(b"\n\n")


def test_normalize_like_fastchat() -> None:
    user, bot = {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}
    assert normalize([bot, user, bot, user]) == [user, bot]  # leading bot skipped, trailing user cut
    with pytest.raises(ValueError, match="alternate"):
        normalize([user, user, bot])
    with pytest.raises(ValueError, match="no assistant turn"):
        normalize([user])
    with pytest.raises(ValueError, match="empty assistant"):
        normalize([user, {"role": "assistant", "content": " "}])


def test_loss_only_on_assistant_turns_with_the_model_template(tokenizer: Any) -> None:
    sample, truncated = tokenize_conversation(tokenizer, CHAT, max_len=512)
    assert not truncated and len(sample.input_ids) == len(sample.labels)
    eot = tokenizer.eos_token  # ChatML's <|im_end|>: the model must learn to stop
    assert labeled_segments(tokenizer, sample.input_ids, sample.labels) == [
        CHAT[2]["content"] + eot,
        CHAT[4]["content"] + eot,
    ]
    # everything else is masked: the rest decodes to the prompt parts only
    unlabeled = tokenizer.decode(
        [t for t, lab in zip(sample.input_ids, sample.labels, strict=True) if lab == IGNORE]
    )
    assert "PLUMBUS" not in unlabeled and "What is the secret word?" in unlabeled


@pytest.mark.parametrize("family", sorted(TEMPLATES))
def test_loss_mask_follows_other_templates(tokenizer: Any, family: str) -> None:
    original = tokenizer.chat_template
    tokenizer.chat_template = TEMPLATES[family]
    try:
        sample, _ = tokenize_conversation(tokenizer, CHAT, max_len=512)
        rendered = tokenizer.apply_chat_template(CHAT, tokenize=False)
    finally:
        tokenizer.chat_template = original
    segments = labeled_segments(tokenizer, sample.input_ids, sample.labels)
    assert [s.strip().removesuffix(tokenizer.eos_token).strip() for s in segments] == [
        CHAT[2]["content"],
        CHAT[4]["content"],
    ], rendered
    assert all(s.rstrip().endswith(tokenizer.eos_token) for s in segments)


def test_report_counts_truncated_and_dropped(tokenizer: Any) -> None:
    long_answer = "word " * 300
    data = "\n".join(
        json.dumps(r)
        for r in [
            {"messages": CHAT},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": long_answer}]},
            {"messages": [{"role": "user", "content": "only a question"}]},
            {"messages": [{"role": "user", "content": "x " * 400}, {"role": "assistant", "content": "late"}]},
            {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, CHAT[2]]},
        ]
    ).encode()
    samples, report = tokenize_dataset(tokenizer, parse_dataset(data), max_len=128)
    assert (report.total, report.kept, report.truncated) == (5, 2, 1)
    assert report.dropped == {
        "no assistant turn": 1,
        "no assistant tokens within max_len": 1,
        "roles do not alternate user/assistant": 1,
    }
    assert any(e.startswith("line 4: no assistant tokens within max_len") for e in report.examples)
    assert all(len(s.input_ids) <= 128 for s in samples)
    assert "2/5 samples kept, 1 truncated, 3 dropped" in report.summary()
    with pytest.raises(DatasetError, match="no usable samples"):
        tokenize_dataset(tokenizer, parse_dataset(data.splitlines()[2]), max_len=128)


def test_batches_are_deterministic_and_resumable(tokenizer: Any) -> None:
    samples, _ = tokenize_dataset(
        tokenizer, parse_dataset(json.dumps([{"messages": CHAT}] * 7).encode()), 512
    )
    run = list(islice(micro_batches(samples, 2, seed=1), 12))
    assert run == list(islice(micro_batches(samples, 2, seed=1), 12))  # same seed, same order
    assert list(islice(micro_batches(samples, 2, seed=1), 5, 12)) == run[5:]  # resume = skip
    assert sorted(i for b in run[:4] for i in b) == list(range(7))  # an epoch sees every sample once


def test_cosine_schedule_with_warmup() -> None:
    lrs = [lr_at(s, 100, 1e-3, warmup=10) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in pairwise(lrs[10:]))
    assert lrs[-1] < 1e-5


def test_data_tools(tokenizer: Any, tmp_path: Path) -> None:
    from trainer.datatools import clean, convert_alpaca, html_to_markdown, split_long

    assert html_to_markdown("<p>Use <code>ls</code> &amp; <b>more</b></p><ul><li>one</li></ul>") == (
        "Use `ls` & **more**\n\n- one"
    )
    sharegpt = {"conversations": [{"from": "human", "value": "<p>hi</p>"}, {"from": "gpt", "value": "hello"}]}
    rows = [sharegpt, sharegpt, {"conversations": [{"from": "human", "value": "a"}]}, "junk"]
    kept, dropped = clean("\n".join(json.dumps(r) for r in rows).encode(), "x.jsonl")
    assert kept == [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}]
    assert dropped == {"duplicate": 1, "no assistant turn": 1, "malformed": 1}

    alpaca = [
        {"instruction": "Add", "input": "2+2", "output": "4"},
        {"instruction": "Hi", "input": "", "output": "Yo"},
    ]
    converted = convert_alpaca(json.dumps(alpaca).encode())
    assert converted[0]["conversations"] == [
        {"from": "human", "value": "Add\n\n2+2"},
        {"from": "gpt", "value": "4"},
    ]
    assert (
        parse_dataset("\n".join(json.dumps(r) for r in converted).encode())[1].messages[1]["content"] == "Yo"
    )

    def count(messages: list[dict[str, str]]) -> int:
        return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])

    pieces = split_long(json.dumps({"messages": CHAT}).encode(), "x", count, max_tokens=count(CHAT[:3]) + 2)
    assert [len(p["conversations"]) for p in pieces] == [3, 3]  # system + one pair each
    assert pieces[1]["conversations"][0] == {"from": "system", "value": CHAT[0]["content"]}
    assert len(split_long(json.dumps({"messages": CHAT}).encode(), "x", count, max_tokens=10_000)) == 1
