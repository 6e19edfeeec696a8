"""The slot KV cache, prefix cache and KV budget of HFEngine, on the real default model in float32.

Greedy output must equal `model.generate`'s token for token: alone, in a batch of 16, and when the
prompt starts from a cached prefix. float32 keeps that exact up to numerical ties (a top-2 logit gap
under 1e-4 in the reference, the policy tests/test_engine.py states); bf16 is not compared across batch
shapes (its rounding flips near-ties with the shape of the matmul).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from bus.errors import NodeBusy
from bus.prefixes import prefix_hashes
from bus.schemas import ChatMessage, SamplingParams
from node.engine import Delta, EngineRequest
from node.hf import HFEngine
from node.kvcache import memory_budget
from node.loader import LoadedModel, load_model
from node.prefix_cache import BLOCK, PrefixCache

pytestmark = pytest.mark.model

CACHE = Path(os.environ.get("CHATBUS_TEST_CACHE", Path.home() / ".cache" / "chatbus-test"))
STEPS = 24
PROMPTS = [
    "What is the capital of France?",
    "Hi",
    "Write a long story about a dragon who learns to bake bread.",
    "Name three colours of the rainbow and describe each in one sentence.",
    "Explain how a steam engine works, step by step.",
    "What is 12 times 7?",
    "Give me a haiku about autumn leaves.",
    "Who wrote Romeo and Juliet?",
    "List four fruits that are red.",
    "Translate 'good morning' into French.",
    "What does a lighthouse keeper do?",
    "Describe the water cycle briefly.",
    "Why is the sky blue?",
    "Suggest a name for a black cat.",
    "How many legs does a spider have?",
    "What is the boiling point of water in Celsius?",
]


@pytest.fixture(scope="module")
def loaded32() -> LoadedModel:
    return load_model(None, cache_dir=CACHE, dtype="float32", progress=lambda _: None)


@pytest.fixture(scope="module")
def engine32(loaded32: LoadedModel) -> Iterator[HFEngine]:
    eng = HFEngine(loaded32, max_running=16)
    eng.start()
    yield eng
    eng.stop()


def user(text: str) -> list[ChatMessage]:
    return [ChatMessage(role="user", content=text)]


def run(engine: HFEngine, requests: list[EngineRequest]) -> dict[str, list[Delta]]:
    """Submit all at once; every request's deltas, in the order they came."""
    out: dict[str, list[Delta]] = {r.request_id: [] for r in requests}
    lock = threading.Lock()
    done = threading.Event()

    def sink(delta: Delta) -> None:
        with lock:
            out[delta.request_id].append(delta)
            if all(d and d[-1].finish_reason for d in out.values()):
                done.set()

    for request in requests:
        engine.submit(request, sink)
    assert done.wait(300), "engine did not finish in time"
    return out


def greedy(request_id: str, messages: list[ChatMessage], steps: int = STEPS) -> EngineRequest:
    params = SamplingParams(temperature=0, max_tokens=steps, logprobs=True)
    return EngineRequest(request_id=request_id, messages=messages, params=params)


def reference(loaded: LoadedModel, messages: list[ChatMessage], steps: int) -> tuple[list[int], list[float]]:
    """model.generate's greedy tokens for this chat, and the top-2 logit gap at each step."""
    turns = [{"role": m.role, "content": m.content} for m in messages]
    ids = loaded.tokenizer.apply_chat_template(
        turns, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.inference_mode():
        out = loaded.model.generate(
            **ids, max_new_tokens=steps, do_sample=False, output_scores=True, return_dict_in_generate=True
        )
    tokens = out.sequences[0, ids["input_ids"].shape[1] :].tolist()
    gaps = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores]
    return tokens, gaps


def assert_same_as_generate(loaded: LoadedModel, messages: list[ChatMessage], deltas: list[Delta]) -> None:
    decode = loaded.tokenizer.decode
    got = [lp.token for d in deltas for lp in d.logprobs or []]
    tokens, gaps = reference(loaded, messages, len(got))
    want = [decode([t]) for t in tokens]
    if got == want:
        return
    first = next(k for k, (a, b) in enumerate(zip(got, want, strict=False)) if a != b)
    assert gaps[first] < 1e-4, f"diverged from generate at token {first}: {got} vs {want}"


# ----------------------------------------------------------------------------- equality with generate


def test_greedy_alone_equals_generate(loaded32: LoadedModel, engine32: HFEngine) -> None:
    messages = user(PROMPTS[0])
    out = run(engine32, [greedy("alone", messages)])
    assert "Paris" in "".join(d.text for d in out["alone"])
    assert_same_as_generate(loaded32, messages, out["alone"])


def test_greedy_batch_of_16_equals_generate(loaded32: LoadedModel, engine32: HFEngine) -> None:
    out = run(engine32, [greedy(f"b{i}", user(p)) for i, p in enumerate(PROMPTS)])
    for i, prompt in enumerate(PROMPTS):
        assert_same_as_generate(loaded32, user(prompt), out[f"b{i}"])


def test_next_turn_reuses_the_prefix_and_equals_generate(loaded32: LoadedModel, engine32: HFEngine) -> None:
    first = [ChatMessage(role="system", content="You are a helpful assistant. " * 8), *user(PROMPTS[10])]
    reply = "".join(d.text for d in run(engine32, [greedy("turn1", first)])["turn1"])
    before = engine32._kv.prefixes.hit_tokens
    second = [*first, ChatMessage(role="assistant", content=reply), *user("And at night?")]
    out = run(engine32, [greedy("turn2", second)])
    prompt = engine32.count_tokens(first, None)
    assert (
        engine32._kv.prefixes.hit_tokens - before >= prompt - BLOCK
    )  # turn 1's prompt was not prefilled again
    assert_same_as_generate(loaded32, second, out["turn2"])


def test_cached_prefixes_name_the_finished_conversation(engine32: HFEngine) -> None:
    messages = user("Tell me one fact about owls.")
    out = run(engine32, [greedy("owls", messages, steps=8)])
    reply = ChatMessage(role="assistant", content="".join(d.text for d in out["owls"]))
    advertised = engine32.stats().cached_prefixes
    assert advertised[0] == prefix_hashes([*messages, reply])[-1]  # most recent first
    assert set(prefix_hashes(messages)) <= set(advertised)
    assert len(advertised) <= 64


# ----------------------------------------------------------------------------- the KV budget


def test_kv_budget_makes_requests_wait_or_rejects_them(loaded32: LoadedModel) -> None:
    probe = HFEngine(loaded32)
    per_token = probe._kv.token_bytes
    eng = HFEngine(loaded32, kv_cache_memory=600 * per_token)  # one short request, not two
    with pytest.raises(NodeBusy, match="KV cache"):
        eng.submit(greedy("huge", user(PROMPTS[0]), steps=400), print)
    eng.start()
    try:
        out = run(eng, [greedy("one", user(PROMPTS[0]), steps=8), greedy("two", user(PROMPTS[1]), steps=8)])
    finally:
        eng.stop()
    assert all(d[-1].finish_reason in ("stop", "length") and d[-1].completion_tokens for d in out.values())
    assert eng._kv.prefixes.nbytes <= 600 * per_token


def test_second_request_waits_for_the_first_under_a_tight_budget(loaded32: LoadedModel) -> None:
    per_token = HFEngine(loaded32)._kv.token_bytes
    eng = HFEngine(loaded32, kv_cache_memory=600 * per_token)
    order: list[str] = []
    done = threading.Event()

    def sink(delta: Delta) -> None:
        order.append(delta.request_id)
        if delta.finish_reason and delta.request_id == "second":
            done.set()

    eng.submit(greedy("first", user(PROMPTS[2]), steps=8), sink)
    eng.submit(greedy("second", user(PROMPTS[3]), steps=8), sink)
    eng.start()
    try:
        assert done.wait(120)
    finally:
        eng.stop()
    assert order == sorted(order, key=lambda r: r != "first"), order  # no overlap: it waited


def test_memory_budget_parsing() -> None:
    assert memory_budget("2GiB") == 2 * 2**30
    assert memory_budget("512MB") == 512 * 10**6
    assert memory_budget("0.5", total=1000) == 500
    assert memory_budget("auto", total=1000) == 250
    assert memory_budget(4096) == 4096
    with pytest.raises(ValueError, match="bad memory size"):
        memory_budget("lots")


# ----------------------------------------------------------------------------- the prefix cache


def kv(n: int, fill: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return [torch.full((1, n, 2), fill)], [torch.full((1, n, 2), fill)]


def test_prefix_cache_longest_block_match_lru_and_bytes() -> None:
    entry_bytes = 2 * 2 * BLOCK * 4 * 2  # 2 blocks of 1 head × 2 dims, keys and values, float32
    cache = PrefixCache(budget=2 * entry_bytes)
    a = list(range(2 * BLOCK))
    b = [7] * (2 * BLOCK)
    cache.insert(a, kv(len(a), 1.0), [11])
    cache.insert(b, kv(len(b), 2.0), [22])
    hit = cache.lookup([*a, 99])
    assert hit is not None and hit[0] == 2 * BLOCK and float(hit[1][0][0][0, 0, 0]) == 1.0
    assert cache.lookup(a) is not None and cache.lookup(a)[0] == 2 * BLOCK - 1  # type: ignore[index]  # one left to feed
    partial = cache.lookup([*a[: BLOCK + 3], 99, 99])  # one whole block, then 3 tokens of the next
    assert partial is not None and partial[0] == BLOCK + 3
    assert cache.lookup([5] * (3 * BLOCK)) is None
    cache.insert([9] * (2 * BLOCK), kv(2 * BLOCK, 3.0), [33])  # over budget: b, least recently used, goes
    assert cache.lookup([*b, 1]) is None and cache.lookup([*a, 1]) is not None
    assert cache.nbytes <= cache.budget and cache.chat_hashes() == [11, 33]
    cache.budget = 4 * entry_bytes
    longer = [*a, *range(100, 100 + BLOCK)]
    cache.insert(longer, kv(len(longer), 4.0), [11, 44])  # a is a prefix of it: replaced, not kept twice
    assert len(cache) == 2 and cache.chat_hashes()[:2] == [44, 11]
    cache.insert(a, kv(len(a), 5.0), [55])  # held already (by `longer`): nothing copied, hashes merged
    assert len(cache) == 2 and cache.chat_hashes()[:3] == [55, 44, 11]
