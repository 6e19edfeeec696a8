"""Per-row LoRA in HFEngine on the real default model (float32): mixed batches, prefix cache, limits."""

from __future__ import annotations

import copy
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from adapters_support import make_adapter, tiny_llama_adapter
from test_engine_cache import run as run_all

from bus.errors import BadRequest, ModelNotFound
from bus.schemas import ChatMessage, Constraint, SamplingParams
from node.engine import Delta, EngineRequest
from node.hf import HFEngine
from node.loader import LoadedModel, load_model
from node.lora import LoraLinear
from node.packing import FusedSlice, can_pack, pack_linears

pytestmark = pytest.mark.model

CACHE = Path(os.environ.get("CHATBUS_TEST_CACHE", Path.home() / ".cache" / "chatbus-test"))
STEPS = 20
QUESTION = [ChatMessage(role="user", content="What is the capital of France?")]
LONG = [  # over two prefix-cache blocks: a cached base prefix would be found for it
    ChatMessage(role="system", content="You are a helpful assistant who answers briefly. " * 4),
    ChatMessage(role="user", content="Name a large animal."),
]


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return load_model(None, cache_dir=CACHE, dtype="float32", progress=lambda _: None)


@pytest.fixture(scope="module")
def pristine(loaded: LoadedModel) -> Any:
    """The base model before any adapter wraps its linears (for references)."""
    return copy.deepcopy(loaded.model)


@pytest.fixture(scope="module")
def dirs(pristine: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("loras")
    out: dict[str, Any] = {}
    for i, targets in enumerate(
        [("q_proj", "v_proj", "up_proj", "down_proj"), ("q_proj", "k_proj", "o_proj", "gate_proj")]
    ):
        out[f"l{i}"] = make_adapter(
            pristine, root / f"l{i}", seed=i + 1, targets=targets, rank=8 * (i + 1), alpha=32 * (i + 1)
        )
    make_adapter(pristine, root / "qwen", seed=9, base="Qwen2.5-0.5B-Instruct")
    tiny_llama_adapter(root / "tiny")
    make_adapter(pristine, root / "dora", seed=3, use_dora=True)
    out["root"] = root
    return out


@pytest.fixture(scope="module")
def engine(loaded: LoadedModel, dirs: dict[str, Any]) -> Iterator[HFEngine]:
    eng = HFEngine(loaded, max_running=16)
    eng.start()
    for name in ("l0", "l1"):
        eng.adapters.load(dirs["root"] / name, name)
    yield eng
    eng.stop()


def run(engine: HFEngine, requests: list[EngineRequest]) -> dict[str, str]:
    """Submit all at once; each request's whole text."""
    out = run_all(engine, requests)
    assert all(d[-1].finish_reason in ("stop", "length") for d in out.values()), out
    return {rid: "".join(d.text for d in deltas) for rid, deltas in out.items()}


def ask(rid: str, adapter: str = "", messages: list[ChatMessage] = QUESTION) -> EngineRequest:
    params = SamplingParams(temperature=0, max_tokens=STEPS)
    return EngineRequest(request_id=rid, messages=messages, params=params, adapter=adapter)


def reference(model: Any, loaded: LoadedModel, messages: list[ChatMessage]) -> str:
    turns = [{"role": m.role, "content": m.content} for m in messages]
    ids = loaded.tokenizer.apply_chat_template(
        turns, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=STEPS, do_sample=False)
    return str(loaded.tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))


def test_each_adapter_answers_as_peft_does(
    engine: HFEngine, loaded: LoadedModel, dirs: dict[str, Any]
) -> None:
    alone = {name: run(engine, [ask(name, name)])[name] for name in ("l0", "l1")}
    base = run(engine, [ask("base")])["base"]
    assert "Paris" in base
    for name in ("l0", "l1"):
        assert alone[name] != base
        assert alone[name].strip() == reference(dirs[name], loaded, QUESTION).strip()


def test_a_mixed_batch_gives_every_row_its_alone_output(engine: HFEngine) -> None:
    names = ["", "l0", "l1", "l0", ""]
    alone = {n: run(engine, [ask(f"alone-{n}", n)])[f"alone-{n}"] for n in set(names)}
    mixed = run(engine, [ask(f"row{i}", n) for i, n in enumerate(names)])
    for i, n in enumerate(names):
        assert mixed[f"row{i}"] == alone[n], (n, mixed[f"row{i}"], alone[n])
    assert len(set(alone.values())) == 3


def test_the_prefix_cache_keeps_adapters_apart(
    engine: HFEngine, loaded: LoadedModel, dirs: dict[str, Any]
) -> None:
    base_first = run(engine, [ask("long-base", "", LONG)])["long-base"]
    hits = engine._kv.prefixes.hits
    tuned = run(engine, [ask("long-l0", "l0", LONG)])["long-l0"]
    assert engine._kv.prefixes.hits == hits  # the base's cached system prompt is not the adapter's
    assert tuned.strip() == reference(dirs["l0"], loaded, LONG).strip() and tuned != base_first
    again = run(engine, [ask("long-l0-again", "l0", LONG)])["long-l0-again"]
    assert engine._kv.prefixes.hits == hits + 1 and again == tuned  # its own prefix is reused


def test_adapters_of_another_model_are_refused(engine: HFEngine, dirs: dict[str, Any]) -> None:
    root = dirs["root"]
    with pytest.raises(BadRequest, match=r"Qwen2\.5-0\.5B-Instruct.*SmolLM2-135M-Instruct"):
        engine.adapters.load(root / "qwen", "qwen")
    with pytest.raises(BadRequest, match="does not fit 'SmolLM2-135M-Instruct'"):
        engine.adapters.load(root / "tiny", "tiny")
    with pytest.raises(BadRequest, match="DoRA"):
        engine.adapters.load(root / "dora", "dora")
    assert engine.adapters.names() == ["l0", "l1"]
    with pytest.raises(ModelNotFound, match="served models: SmolLM2-135M-Instruct, l0, l1"):
        engine.submit(ask("nope", "nope"), lambda d: None)


def test_the_least_recently_used_idle_adapter_is_evicted(
    loaded: LoadedModel, engine: HFEngine, dirs: dict[str, Any]
) -> None:
    root = dirs["root"]
    engine.adapters.max_adapters = 2
    try:
        run(engine, [ask("touch-l0", "l0")])  # l1 is now the least recently used
        engine.adapters.load(root / "l0", "l0-copy")
        assert sorted(engine.adapters.names()) == ["l0", "l0-copy"]
        assert run(engine, [ask("copy", "l0-copy")])["copy"] == run(engine, [ask("orig", "l0")])["orig"]
        assert engine.adapters.unload("l0-copy") == 0
        engine.adapters.load(root / "l1", "l1")
    finally:
        engine.adapters.max_adapters = 8
    assert sorted(engine.adapters.names()) == ["l0", "l1"]


def test_unload_lets_running_rows_finish_and_a_base_only_batch_skips_lora(
    engine: HFEngine, dirs: dict[str, Any]
) -> None:
    deltas: list[Delta] = []
    finished = threading.Event()

    def sink(delta: Delta) -> None:
        deltas.append(delta)
        if delta.finish_reason:
            finished.set()

    params = SamplingParams(temperature=0, max_tokens=48)
    engine.submit(EngineRequest(request_id="long", messages=QUESTION, params=params, adapter="l1"), sink)
    while not deltas:
        finished.wait(0.01)
    assert engine.adapters.unload("l1") == 1  # still running: it finishes first
    assert engine.adapters.names() == ["l0"]
    with pytest.raises(ModelNotFound):
        engine.submit(ask("late", "l1"), lambda d: None)
    assert finished.wait(120)
    assert deltas[-1].finish_reason in ("length", "stop") and deltas[-1].completion_tokens > 1
    described = {d["name"] for d in engine.adapters.describe()}
    assert described == {"l0"}  # gone with its last row
    calls: list[int] = []
    wrapper = next(m for m in engine._m.model.modules() if isinstance(m, LoraLinear))
    hook = wrapper.register_forward_hook(lambda *_: calls.append(wrapper._bank[0].mask is None))
    try:
        run(engine, [ask("base-only")])
    finally:
        hook.remove()
    assert calls and all(calls)  # no mask: the LoRA term was skipped
    engine.adapters.load(dirs["root"] / "l1", "l1")


def test_a_failed_request_gives_its_adapter_back(engine: HFEngine) -> None:
    """A sink that raises (its client is gone) or a constraint that does not compile must not keep a
    hold on the adapter, or an unload of it would wait for ever."""

    def running() -> int:
        return next(a["running"] for a in engine.adapters.describe() if a["name"] == "l0")

    failed = threading.Event()

    def broken(delta: Delta) -> None:
        failed.set()
        raise RuntimeError("the client went away")

    engine.submit(ask("broken-sink", "l0"), broken)
    assert failed.wait(120)
    for _ in range(200):
        if running() == 0:
            break
        threading.Event().wait(0.05)
    assert running() == 0
    bad = EngineRequest(
        request_id="bad-grammar",
        messages=QUESTION,
        params=SamplingParams(max_tokens=4),
        adapter="l0",
        constraint=Constraint(kind="json_schema", text="{not json"),
    )
    with pytest.raises(BadRequest):
        engine.submit(bad, lambda d: None)
    assert running() == 0


@pytest.mark.skipif(not can_pack(), reason="oneDNN's prepacked bf16 linear is not in this torch build")
def test_fused_projections_answer_as_separate_ones_with_and_without_adapters(dirs: dict[str, Any]) -> None:
    """bf16 on CPU packs each layer's q/k/v and gate/up into one product (node/packing.py): greedy
    answers of base rows and of adapter rows (whose LoRA wraps the fused slices) equal, token for
    token, those of separately packed projections."""
    fused = load_model(None, cache_dir=CACHE, dtype="bfloat16", progress=lambda _: None)
    separate = load_model(None, cache_dir=CACHE, dtype="bfloat16", progress=lambda _: None)
    pack_linears(separate.model, fuse=False)
    answers = []
    for loaded in (fused, separate):
        eng = HFEngine(loaded, max_running=4)
        eng.start()
        try:
            for name in ("l0", "l1"):
                eng.adapters.load(dirs["root"] / name, name)
            answers.append(run(eng, [ask("base"), ask("a0", "l0"), ask("a1", "l1")]))
        finally:
            eng.stop()
    layers = len(fused.model.get_decoder().layers)
    assert sum(isinstance(m, FusedSlice) for m in fused.model.modules()) == 5 * layers
    assert not any(isinstance(m, FusedSlice) for m in separate.model.modules())
    assert answers[0] == answers[1]
    assert len(set(answers[0].values())) == 3, answers[0]  # the adapters did change the answers
