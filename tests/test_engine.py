"""HFEngine and the loader, through the real default model (SmolLM2-135M-Instruct).

Two engines share the module: the default (bf16 on CPU) for behaviour, and an fp32 one where outputs
are compared across batch compositions (bf16 rounding makes near-ties flip with the batch shape; fp32
shows whether the batching itself is exact).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from bus.errors import BadRequest, ContextLengthExceeded
from bus.schemas import ChatMessage, SamplingParams
from node.engine import Delta, EngineRequest
from node.hf import HFEngine, TextStream
from node.loader import LoadedModel, ModelLoadError, load_model

pytestmark = pytest.mark.model

CACHE = Path(os.environ.get("CHATBUS_TEST_CACHE", Path.home() / ".cache" / "chatbus-test"))
FRANCE = "What is the capital of France?"
STORY = "Write a long story about a dragon who learns to bake bread."
GREEDY = SamplingParams(temperature=0, max_tokens=24)
COLOURS = "Name three colours of the rainbow and describe each in one sentence."
LONG = (
    "The old lighthouse stood at the edge of the cliff, its lamp turning slowly through the fog "
    "while the keeper wrote in his logbook. "
) * 6 + "Summarise this."  # ~200 tokens


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    # bf16 explicitly: "auto" picks it only on CPUs that multiply it natively; engine32 covers float32.
    return load_model(None, cache_dir=CACHE, dtype="bfloat16", progress=lambda _: None)


@pytest.fixture(scope="module")
def engine(loaded: LoadedModel) -> Iterator[HFEngine]:
    eng = HFEngine(loaded, max_running=8)
    eng.start()
    yield eng
    eng.stop()


@pytest.fixture(scope="module")
def loaded32() -> LoadedModel:
    return load_model(None, cache_dir=CACHE, dtype="float32", progress=lambda _: None)


@pytest.fixture(scope="module")
def engine32(loaded32: LoadedModel) -> Iterator[HFEngine]:
    eng = HFEngine(loaded32, max_running=8, prefill_chunk=16)  # small chunks: exercise chunked prefill
    eng.start()
    yield eng
    eng.stop()


def chat(request_id: str, text: str, params: SamplingParams = GREEDY) -> EngineRequest:
    return EngineRequest(
        request_id=request_id, messages=[ChatMessage(role="user", content=text)], params=params
    )


class Collector:
    """A sink that records deltas per request and signals when all submitted requests finished."""

    def __init__(self, on_delta: Callable[[Delta], None] | None = None) -> None:
        self.on_delta = on_delta
        self.deltas: dict[str, list[Delta]] = {}
        self._lock = threading.Lock()
        self._open = 0
        self.done = threading.Event()

    def submit(self, engine: HFEngine, *requests: EngineRequest) -> None:
        with self._lock:
            self._open += len(requests)
            self.done.clear()
        for request in requests:
            self.deltas[request.request_id] = []
            engine.submit(request, self)

    def __call__(self, delta: Delta) -> None:
        with self._lock:
            self.deltas[delta.request_id].append(delta)
            if delta.finish_reason:
                self._open -= 1
                if self._open == 0:
                    self.done.set()
        if self.on_delta is not None:
            self.on_delta(delta)

    def wait(self) -> Collector:
        assert self.done.wait(120), "engine did not finish in time"
        return self

    def text(self, request_id: str) -> str:
        return "".join(d.text for d in self.deltas[request_id])

    def last(self, request_id: str) -> Delta:
        return self.deltas[request_id][-1]


def run(engine: HFEngine, *requests: EngineRequest) -> Collector:
    collector = Collector()
    collector.submit(engine, *requests)
    return collector.wait()


# ----------------------------------------------------------------------------- behaviour


def test_greedy_answer_and_stream_shape(engine: HFEngine) -> None:
    out = run(engine, chat("paris", FRANCE))
    deltas = out.deltas["paris"]
    assert "Paris" in out.text("paris")
    assert [d.finish_reason is not None for d in deltas].count(True) == 1
    assert deltas[-1].finish_reason == "stop"
    assert sum(d.tokens for d in deltas) == deltas[-1].completion_tokens
    assert deltas[-1].prompt_tokens == engine.count_tokens([ChatMessage(role="user", content=FRANCE)], None)


def test_float32_weights_are_input_major_and_answer_the_same(
    loaded32: LoadedModel, engine32: HFEngine
) -> None:
    model = loaded32.model
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    assert linears and all(m.weight.stride() == (1, m.weight.shape[0]) for m in linears)
    if model.config.tie_word_embeddings:  # tied weights stay one tensor
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert "Paris" in run(engine32, chat("paris32", FRANCE)).text("paris32")


def test_stop_string_is_honoured_and_not_emitted(engine: HFEngine) -> None:
    params = SamplingParams(temperature=0, max_tokens=24, stop=["Paris"])
    out = run(engine, chat("stop", FRANCE, params))
    assert out.last("stop").finish_reason == "stop"
    assert out.text("stop") == "The capital of France is "
    assert all("P" not in d.text for d in out.deltas["stop"])  # the held-back prefix never leaked


def test_max_tokens_finishes_with_length(engine: HFEngine) -> None:
    out = run(engine, chat("len", STORY, SamplingParams(temperature=0, max_tokens=5)))
    last = out.last("len")
    assert (last.finish_reason, last.completion_tokens) == ("length", 5)
    assert out.text("len")


def test_stops_and_max_tokens_hold_per_request_inside_a_batch(engine: HFEngine) -> None:
    order: list[str] = []  # request ids in the order their deltas came: shows they ran together
    collector = Collector(on_delta=lambda d: order.append(d.request_id))
    collector.submit(
        engine,
        chat("b-stop", FRANCE, SamplingParams(temperature=0, max_tokens=24, stop=["Paris"])),
        chat("b-len5", STORY, SamplingParams(temperature=0, max_tokens=5)),
        chat("b-free", FRANCE, SamplingParams(temperature=0, max_tokens=24)),
        chat("b-len9", COLOURS, SamplingParams(temperature=0, max_tokens=9)),
    )
    out = collector.wait()
    assert (out.last("b-stop").finish_reason, out.text("b-stop")) == ("stop", "The capital of France is ")
    assert (out.last("b-len5").finish_reason, out.last("b-len5").completion_tokens) == ("length", 5)
    assert (out.last("b-len9").finish_reason, out.last("b-len9").completion_tokens) == ("length", 9)
    assert out.last("b-free").finish_reason == "stop" and "Paris" in out.text("b-free")
    last_of_first_finisher = min(max(i for i, r in enumerate(order) if r == rid) for rid in out.deltas)
    assert len(set(order[: last_of_first_finisher + 1])) == 4, "the four were not decoded together"


def test_seeded_sampling_repeats(engine: HFEngine) -> None:
    params = SamplingParams(
        temperature=1.0, top_p=0.9, top_k=50, seed=7, max_tokens=12, repetition_penalty=1.1
    )
    first = run(engine, chat("s1", STORY, params)).text("s1")
    second = run(engine, chat("s2", STORY, params)).text("s2")
    assert first == second and first


def test_logprobs(engine: HFEngine) -> None:
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=True, top_logprobs=3)
    out = run(engine, chat("lp", FRANCE, params))
    logprobs = [lp for d in out.deltas["lp"] for lp in d.logprobs or []]
    assert len(logprobs) == out.last("lp").completion_tokens
    assert all(len(lp.top) == 3 and lp.logprob <= 0 for lp in logprobs)
    assert all(lp.top[0].logprob == pytest.approx(lp.logprob) for lp in logprobs)  # greedy takes the top


def test_context_length_and_bad_requests_raise_at_submit(engine: HFEngine) -> None:
    context = engine.card.context_length
    with pytest.raises(ContextLengthExceeded, match=f"model context is {context}"):
        engine.submit(EngineRequest(request_id="big", prompt="hello " * (context + 10)), print)
    with pytest.raises(ContextLengthExceeded, match="max_tokens"):
        engine.submit(chat("big2", FRANCE, SamplingParams(max_tokens=context)), print)
    with pytest.raises(BadRequest):
        engine.submit(EngineRequest(request_id="none"), print)
    assert engine.stats().queued == 0


def test_cancel_takes_effect_next_step_and_spares_the_batch(engine32: HFEngine) -> None:
    alone = run(engine32, chat("b-alone", FRANCE)).text("b-alone")
    cancelled_at: list[int] = []

    def cancel_a(delta: Delta) -> None:
        if delta.request_id == "a" and delta.completion_tokens >= 3 and not cancelled_at:
            cancelled_at.append(delta.completion_tokens)
            engine32.cancel("a")  # from the worker thread: must land before the next decode step

    out = Collector(on_delta=cancel_a)
    out.submit(engine32, chat("a", STORY, SamplingParams(temperature=0, max_tokens=200)), chat("b", FRANCE))
    out.wait()
    assert out.last("a").finish_reason == "cancelled"
    assert out.last("a").completion_tokens == cancelled_at[0]
    assert out.text("b") == alone
    assert engine32.stats().running == 0


def test_stop_cancels_everything(loaded: LoadedModel) -> None:
    eng = HFEngine(loaded)
    out = Collector()
    out.submit(eng, chat("x", STORY, SamplingParams(max_tokens=500)), chat("y", STORY))
    eng.start()
    eng.stop()
    assert out.done.is_set()
    assert {out.last("x").finish_reason, out.last("y").finish_reason} == {"cancelled"}


# ----------------------------------------------------------------------------- batching is exact


def reference_greedy(loaded: LoadedModel, text: str, steps: int) -> tuple[list[int], list[float]]:
    """Plain transformers greedy decoding: token ids and the top-2 logit gap at each step."""
    ids = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.inference_mode():
        out = loaded.model.generate(
            **ids, max_new_tokens=steps, do_sample=False, output_scores=True, return_dict_in_generate=True
        )
    tokens = out.sequences[0, ids["input_ids"].shape[1] :].tolist()
    gaps = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores]
    return tokens, gaps


def test_greedy_batch_equals_alone(loaded32: LoadedModel, engine32: HFEngine) -> None:
    prompts = [FRANCE, "Hi", STORY, COLOURS]
    out = run(engine32, *(chat(f"p{i}", p) for i, p in enumerate(prompts)))
    decode = loaded32.tokenizer.decode
    for i, prompt in enumerate(prompts):
        tokens, gaps = reference_greedy(loaded32, prompt, GREEDY.max_tokens or 0)
        expected = decode([t for t in tokens if t not in loaded32.eos_ids], skip_special_tokens=True)
        got = out.text(f"p{i}")
        if got != expected:  # allowed only where the reference itself had a numerical tie
            first = next(k for k in range(len(tokens)) if not got.startswith(decode(tokens[: k + 1])))
            assert gaps[first] < 1e-4, f"prompt {i} diverged at token {first}: {got!r} vs {expected!r}"


def tokens_and_gaps(out: Collector, request_id: str) -> tuple[list[str], list[float]]:
    """Each generated token and its top-2 logit gap (a logprob gap is the same logit gap)."""
    logprobs = [lp for d in out.deltas[request_id] for lp in d.logprobs or []]
    return [lp.token for lp in logprobs], [lp.top[0].logprob - lp.top[1].logprob for lp in logprobs]


def test_prefilled_together_equals_alone(
    loaded32: LoadedModel, engine32: HFEngine, caplog: pytest.LogCaptureFixture
) -> None:
    shorts = ["Hi", FRANCE, STORY, COLOURS]  # 31 to 43 tokens once templated
    widest = max(engine32.count_tokens([ChatMessage(role="user", content=p)], None) for p in shorts)
    params = SamplingParams(temperature=0, max_tokens=24, logprobs=True, top_logprobs=2)
    prompts = [*shorts, LONG]
    eng = HFEngine(loaded32, max_running=8, prefill_chunk=4 * widest)  # LONG is longer: chunked alone
    together = Collector()
    with caplog.at_level(logging.DEBUG, logger="node.hf"):
        together.submit(eng, *(chat(f"t{i}", p, params) for i, p in enumerate(prompts)))
        eng.start()  # after submitting: the worker finds all five waiting
        try:
            together.wait()
            alone = [run(eng, chat(f"a{i}", p, params)) for i, p in enumerate(prompts)]
        finally:
            eng.stop()
    prefills = [r.getMessage() for r in caplog.records if r.getMessage().startswith("prefill:")]
    assert prefills[0].startswith(f"prefill: 4 rows × {widest} columns"), prefills  # one left-padded forward
    assert prefills[1].startswith("prefill: 1 row, chunk of"), prefills  # then LONG, while the four decode
    for i in range(len(prompts)):
        got, gaps = tokens_and_gaps(together, f"t{i}")
        want, _ = tokens_and_gaps(alone[i], f"a{i}")
        if got == want:
            assert together.text(f"t{i}") == alone[i].text(f"a{i}")
            continue
        # Allowed only where the batched run itself met a numerical tie at the first divergence.
        first = next(k for k, (a, b) in enumerate(zip(got, want, strict=False)) if a != b)
        assert gaps[first] < 1e-4, (
            f"prompt {i} diverged at token {first} (gap {gaps[first]}): {got} vs {want}"
        )


def test_cancel_while_queued_or_mid_prefill_frees_everything(loaded32: LoadedModel) -> None:
    eng = HFEngine(loaded32, max_running=8, prefill_chunk=16)  # LONG * 3: ~35 chunks, seconds of prefill
    out = Collector()
    out.submit(eng, chat("queued", STORY), chat("long", LONG * 3), chat("after", FRANCE))
    eng.cancel("queued")
    eng.start()
    try:
        deadline = time.monotonic() + 60
        while eng.stats().running == 0:  # "long" left the queue: it is being prefilled
            assert time.monotonic() < deadline, "prefill never started"
            time.sleep(0.005)
        eng.cancel("long")
        out.wait()
        assert [out.last(r).finish_reason for r in ("queued", "long")] == ["cancelled", "cancelled"]
        assert [out.last(r).completion_tokens for r in ("queued", "long")] == [0, 0]  # never got a token
        assert "Paris" in out.text("after")
        stats = eng.stats()
        assert (stats.running, stats.queued) == (0, 0)
        while eng._prefilling or eng._batch.rows:  # the last delta goes out just before rows are dropped
            assert time.monotonic() < deadline, "KV cache rows left behind"
            time.sleep(0.005)
    finally:
        eng.stop()


def test_embeddings_normalised_and_batch_equals_single(engine32: HFEngine) -> None:
    texts = ["The cat sat on the mat.", "Quantum chromodynamics", "hi"]
    batch, used = engine32.embed(texts)
    assert used == sum(engine32.count_tokens(None, t) for t in texts)
    for text, vector in zip(texts, batch, strict=True):
        single, _ = engine32.embed([text])
        assert sum(v * v for v in vector) == pytest.approx(1.0, abs=1e-4)
        assert vector == pytest.approx(single[0], abs=1e-4)


def test_embeddings_run_on_the_engine_thread(loaded32: LoadedModel, engine32: HFEngine) -> None:
    """torch used from a second thread slows every later decode step (docs/benchmarks.md): the
    embeddings forward must run where the decode steps do, whoever asks for it."""
    threads: list[str] = []
    hook = loaded32.model.get_decoder().register_forward_hook(
        lambda *_: threads.append(threading.current_thread().name)
    )
    try:
        run(engine32, chat("before-embed", FRANCE, SamplingParams(temperature=0, max_tokens=2)))
        engine32.embed(["asked from the test's thread"])
    finally:
        hook.remove()
    assert threads and set(threads) == {f"engine-{loaded32.name}"}, threads


_TEAM_PROBE = """
import os, sys
from pathlib import Path
import torch
from node.hf import HFEngine
from node.loader import load_model
threads = lambda: len(os.listdir("/proc/self/task"))
engine = HFEngine(load_model(None, cache_dir=Path(sys.argv[1]), dtype="bfloat16", progress=print), threads=1)
engine.start()
engine.embed(["runs on the worker"])
print("WORKER", engine._on_worker(torch.get_num_threads))  # threads=1 holds where the steps run
before = threads()
torch.ones(1 << 22).sum()  # the first parallel region on this thread adds its OpenMP team's threads
print("TEAM", before, threads())
engine.stop()
"""


@pytest.mark.skipif(
    not Path("/proc/self/task").is_dir() or torch.get_num_threads() < 2, reason="needs Linux and 2+ threads"
)
def test_loading_leaves_no_openmp_team_outside_the_engine_thread() -> None:
    """A parallel region on the loading thread (can_pack's probe did one) leaves a second OpenMP team,
    and libgomp then throttles every decode step (1.5x slower at batch 1, bench/omp_team.py). After
    loading, packing and serving, the loading thread's first parallel region must still make a team."""
    out = subprocess.run(
        [sys.executable, "-c", _TEAM_PROBE, str(CACHE)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    line = next((x for x in out.stdout.splitlines() if x.startswith("TEAM")), None)
    assert line is not None, out.stdout + out.stderr
    before, after = (int(x) for x in line.split()[1:])
    assert after > before, "something ran a parallel region on the loading thread: see node/packing.py"
    assert "WORKER 1" in out.stdout, out.stdout


# ----------------------------------------------------------------------------- text streaming, loader


def test_text_stream_never_splits_characters_or_leaks_stop_prefixes(loaded: LoadedModel) -> None:
    tok = loaded.tokenizer
    text = "Café 🙂 naïve — 東京 done </stop> after"
    stream = TextStream(tok, [], ["</stop>"])
    pieces = [stream.push(t) for t in tok(text, add_special_tokens=False)["input_ids"]]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == "Café 🙂 naïve — 東京 done "
    assert stream.stopped


def test_loader_reuses_conversion_and_rejects_bad_paths(loaded: LoadedModel, tmp_path: Path) -> None:
    lines: list[str] = []
    again = load_model("default", cache_dir=CACHE, progress=lines.append)
    assert not any("convert" in line for line in lines)
    assert again.name == "SmolLM2-135M-Instruct" and again.eos_ids == loaded.eos_ids
    assert not list(CACHE.glob(".SmolLM2-135M-Instruct.*"))  # no half-written temp dirs left
    with pytest.raises(ModelLoadError, match="model dir"):
        load_model(str(tmp_path / "missing"), cache_dir=CACHE, progress=lines.append)
    local = load_model(str(CACHE / "SmolLM2-135M-Instruct"), cache_dir=CACHE, progress=lines.append)
    assert local.name == "SmolLM2-135M-Instruct" and local.context_length == loaded.context_length
