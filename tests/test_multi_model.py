"""Several models in one node process (`--model` repeated, FastChat's multi-model worker) and aliases."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from procs import node_process, wait_until

from bus import BusClient, ChatMessage, SamplingParams
from node.__main__ import parse

pytestmark = pytest.mark.model

FRANCE = [ChatMessage(role="user", content="What is the capital of France?")]


def test_names_go_with_their_model() -> None:
    cfg = parse(["--model", "default", "--model", "/m/other", "--model-names", "a,a2", "--model-names", "b"])
    assert (cfg.model, cfg.name, cfg.aliases) == ("default", "a", ("a2",))
    assert cfg.extra_models == (("/m/other", "b"),)
    assert parse(["--model-names", "x,y"]).name == "x"
    for wrong in (
        ["--model", "a", "--model", "b", "--name", "x"],  # which model is x?
        ["--model-names", "a", "--model-names", "b"],  # two name lists for one model
        ["--name", "x", "--model-names", "y,z"],
    ):
        with pytest.raises(SystemExit):
            parse(wrong)


async def _served(nats_url: str) -> dict[str, list[str]]:
    client = await BusClient.connect(nats_url, name="multi-test")
    try:
        return {name: [n.node_id for n in entry.nodes] for name, entry in client.models().items()}
    finally:
        await client.close()


async def test_one_process_serves_two_models_under_their_names(nats_url: str, tmp_path: Path) -> None:
    extra = ["--model", "default", "--model-names", "smol-a,smol-a2", "--model-names", "smol-b"]
    log = tmp_path / "node.log"
    with node_process(nats_url, log, extra=["--dtype", "float32", *extra]) as proc:
        wanted = {"smol-a", "smol-a2", "smol-b"}
        await asyncio.to_thread(
            wait_until, lambda: wanted <= set(asyncio.run(_served(nats_url))), 300, proc, log
        )
        served = await _served(nats_url)
        assert served["smol-a"] == served["smol-a2"] and served["smol-a"] != served["smol-b"]
        assert served["smol-b"][0] == served["smol-a"][0] + "-1"  # a node id per model, one process
        client = await BusClient.connect(nats_url, name="multi-test")
        try:
            answers = []
            for model in sorted(wanted):
                stream = client.chat(model, FRANCE, SamplingParams(temperature=0, max_tokens=12))
                _ = [e async for e in stream]
                answers.append(stream.text)
            assert len(set(answers)) == 1 and "Paris" in answers[0], answers  # the same model thrice
        finally:
            await client.close()
