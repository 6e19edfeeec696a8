"""LlamaCppEngine (llama.cpp through xllamacpp) on the real default model: in-process and as a node.

Greedy answers are compared with llama.cpp's own plain completion of the same prompt, not with the
torch engine: llama.cpp multiplies the Q4_1 weights with 8-bit activations, so near-ties can go the
other way than in the dequantized float model (for "What is the capital of France?" the first token
is "L" at logprob -1.85 against "The" at -2.01, docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest
from procs import node_argv, spawn, stop
from test_engine import Collector, chat, run

from bus import BusClient, ChatMessage, Chunk, Done, SamplingParams
from bus.errors import ContextLengthExceeded
from bus.prefixes import prefix_hashes
from node.engine import EngineRequest
from node.llamacpp import LlamaCppEngine, import_llamacpp
from node.native import build_llamacpp, bundled_gguf, self_check
from node.prompting import render_chat

pytestmark = pytest.mark.model

MODEL = "SmolLM2-135M-Instruct"
FRANCE = "What is the capital of France? Answer in one sentence."
STORY = "Write a long story about a dragon who learns to bake bread."
GREEDY = SamplingParams(temperature=0, max_tokens=24)


@pytest.fixture(scope="module")
def engine(model_cache) -> Iterator[LlamaCppEngine]:
    eng = build_llamacpp(
        cache_dir=model_cache, name=None, max_running=4, max_queued=8, threads=None, progress=lambda _: None
    )
    eng.start()
    yield eng
    eng.stop()


def test_greedy_answer_and_stream_shape(engine: LlamaCppEngine) -> None:
    out = run(engine, chat("paris", FRANCE))  # type: ignore[arg-type]
    deltas = out.deltas["paris"]
    assert "Paris" in out.text("paris")
    assert len(deltas) > 2 and all(d.finish_reason is None for d in deltas[:-1])
    assert deltas[-1].finish_reason == "stop"
    assert sum(d.tokens for d in deltas) == deltas[-1].completion_tokens
    assert [d.completion_tokens for d in deltas] == sorted(d.completion_tokens for d in deltas)
    assert deltas[-1].prompt_tokens == engine.count_tokens([ChatMessage(role="user", content=FRANCE)], None)
    timed = [d for d in deltas if d.prefill_s is not None]  # once, for node/metrics.py's histograms
    assert len(timed) == 1 and timed[0] is deltas[0] and timed[0].queue_s is not None
    assert 0 <= timed[0].queue_s < 5 and 0 < timed[0].prefill_s < 30


def test_greedy_equals_llamacpps_own_completion(engine: LlamaCppEngine) -> None:
    """Token for token what the library answers to the rendered prompt, tokenized by llama.cpp itself."""
    xlc = import_llamacpp()
    params = xlc.CommonParams()
    params.model.path = str(bundled_gguf())
    params.n_ctx, params.n_parallel, params.verbosity = 2048, 1, -1
    plain = xlc.Server(params)
    for i, question in enumerate([FRANCE, "What is the capital of France?", STORY]):
        text = render_chat(engine._tok, [ChatMessage(role="user", content=question)])
        theirs = plain.handle_completions({"prompt": text, "max_tokens": 32, "temperature": 0, "logprobs": 1})
        their_tokens = [e["token"] for e in theirs["choices"][0]["logprobs"]["content"]]
        params_ = SamplingParams(temperature=0, max_tokens=32, logprobs=True)
        out = run(engine, chat(f"eq{i}", question, params_))  # type: ignore[arg-type]
        ours = [lp.token for d in out.deltas[f"eq{i}"] for lp in d.logprobs or []]
        assert ours == their_tokens[: len(ours)] and len(ours) >= min(len(their_tokens), 32) - 1
        assert out.text(f"eq{i}") == theirs["choices"][0]["text"]


def test_stop_strings_and_max_tokens(engine: LlamaCppEngine) -> None:
    stopped = SamplingParams(temperature=0, max_tokens=24, stop=["Paris"])
    short = SamplingParams(temperature=0, max_tokens=5)
    out = run(engine, chat("stop", FRANCE, stopped), chat("short", STORY, short))  # type: ignore[arg-type]
    assert out.last("stop").finish_reason == "stop"
    assert "Paris" not in out.text("stop") and out.text("stop").startswith("The capital of France is")
    assert out.last("short").finish_reason == "length" and out.last("short").completion_tokens == 5


def test_seeded_sampling_repeats_and_continuation_follows_on(engine: LlamaCppEngine) -> None:
    seeded = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=7, max_tokens=20)
    out = run(engine, chat("s1", STORY, seeded))  # type: ignore[arg-type]
    again = run(engine, chat("s2", STORY, seeded))  # type: ignore[arg-type]
    assert out.text("s1") == again.text("s2") and out.text("s1")
    done = run(engine, chat("whole", FRANCE))  # type: ignore[arg-type]
    whole, deltas = done.text("whole"), done.deltas["whole"]
    head = "".join(d.text for d in deltas[: len(deltas) // 2])  # what a failed node had streamed
    request = EngineRequest(
        request_id="cont",
        messages=[ChatMessage(role="user", content=FRANCE)],
        params=GREEDY,
        continuation=head,
    )
    assert head + run(engine, request).text("cont") == whole  # type: ignore[arg-type]


def test_cancel_stops_a_running_request(engine: LlamaCppEngine) -> None:
    first = threading.Event()
    collector = Collector(on_delta=lambda d: first.set())
    collector.submit(engine, chat("long", STORY, SamplingParams(temperature=0, max_tokens=400)))  # type: ignore[arg-type]
    assert first.wait(60)
    engine.cancel("long")
    collector.wait()
    last = collector.last("long")
    assert last.finish_reason == "cancelled" and last.completion_tokens < 400
    assert engine.stats().running == 0


def test_four_concurrent_requests_each_get_their_own_answer(engine: LlamaCppEngine) -> None:
    """Decoded together (llama.cpp is not batch-invariant: near-ties may flip, so answers are checked
    for content, and per-request limits for exactness)."""
    requests = [
        chat("c0", FRANCE),
        chat("c1", "What is 2 + 2? Answer with the number.", SamplingParams(temperature=0, max_tokens=24)),
        chat("c2", STORY, SamplingParams(temperature=0, max_tokens=7)),
        chat("c3", FRANCE, SamplingParams(temperature=0, max_tokens=24, stop=["France"])),
    ]
    seen_running: list[int] = []
    collector = Collector(on_delta=lambda d: seen_running.append(engine.stats().running))
    collector.submit(engine, *requests)  # type: ignore[arg-type]
    out = collector.wait()
    assert "Paris" in out.text("c0") and out.last("c0").finish_reason == "stop"
    assert "4" in out.text("c1") and "Paris" not in out.text("c1")
    assert out.last("c2").finish_reason == "length" and out.last("c2").completion_tokens == 7
    assert out.text("c3") == "The capital of " and out.last("c3").finish_reason == "stop"
    assert max(seen_running) > 1  # they did run together


def test_context_is_checked_and_prefixes_are_advertised(engine: LlamaCppEngine) -> None:
    with pytest.raises(ContextLengthExceeded):
        engine.submit(chat("big", FRANCE, SamplingParams(max_tokens=10**6)), lambda d: None)
    out = run(engine, chat("turn", "Say hello."))  # type: ignore[arg-type]
    said = [
        ChatMessage(role="user", content="Say hello."),
        ChatMessage(role="assistant", content=out.text("turn")),
    ]
    assert prefix_hashes(said)[-1] in engine.stats().cached_prefixes


def test_self_check_passes_here() -> None:
    gguf = bundled_gguf()
    assert gguf is not None and self_check(gguf) == ""


# ----------------------------------------------------------------------------- a real node on the bus


@pytest.fixture(scope="module")
async def native_node(nats_url: str, client: BusClient, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("native") / "node.log"
    proc = spawn(node_argv(nats_url, extra=["--engine", "llamacpp", "--node-id", "t-native"]), log)
    try:
        for _ in range(1200):
            entry = client.models().get(MODEL)
            if entry and entry.nodes:
                break
            assert proc.poll() is None, log.read_text()
            await asyncio.sleep(0.25)
        else:
            raise AssertionError("native node did not come up")
        yield proc
    finally:
        stop(proc)


async def test_node_on_the_bus_streams_and_cancels(native_node, client: BusClient) -> None:
    stream = client.chat(MODEL, [ChatMessage(role="user", content=FRANCE)], GREEDY)
    events = [e async for e in stream]
    assert "Paris" in "".join(e.text for e in events if isinstance(e, Chunk))
    assert isinstance(events[-1], Done) and events[-1].finish_reason == "stop"
    said = [ChatMessage(role="user", content=FRANCE), ChatMessage(role="assistant", content=stream.text)]
    key = prefix_hashes(said)[-1]
    for _ in range(100):  # the next heartbeat says the node holds this conversation
        node = next(n for n in client.nodes() if n.node_id == "t-native")
        if key in node.cached_prefixes:
            break
        await asyncio.sleep(0.2)
    assert node.dtype == "gguf" and key in node.cached_prefixes
    long = client.chat(
        MODEL, [ChatMessage(role="user", content=STORY)], SamplingParams(temperature=0, max_tokens=400)
    )
    assert isinstance(await anext(long), Chunk)
    await long.cancel()
    rest = [e async for e in long]
    assert isinstance(rest[-1], Done) and rest[-1].finish_reason == "cancelled"
    for _ in range(100):
        node = next(n for n in client.nodes() if n.node_id == "t-native")
        if node.running == 0:
            break
        await asyncio.sleep(0.2)
    assert node.running == 0
