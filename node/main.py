"""Run a node: load the model, join the bus, serve until a signal, then drain and deregister."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from bus.auth import redact
from bus.connection import connect
from bus.errors import BusError
from node.engine import Engine

__all__ = ["NodeConfig", "main", "serve"]

log = logging.getLogger("node")


@dataclass(frozen=True)
class NodeConfig:
    model: str = "default"
    name: str | None = None
    adapter: str | None = None  # a train job id or a `models/<digest>` artifact
    nats: str = "nats://127.0.0.1:4222"
    device: str = "auto"
    dtype: str = "auto"
    load_8bit: bool = False
    load_4bit: bool = False
    num_gpus: int | None = None
    max_gpu_memory: str | None = None
    cpu_offloading: bool = False
    max_running: int = 16
    max_queued: int = 64
    prefill_chunk: int = 128
    engine: str = "hf"  # auto | hf | llamacpp (node/native.py)
    threads: int | None = None  # llama.cpp's threads (default: every core)
    node_id: str | None = None
    cache_dir: Path = Path(".cache/chatbus/models")
    drain_timeout: float = 30.0
    verbose: bool = False


def say(line: str) -> None:
    print(f"[node] {line}", file=sys.stderr, flush=True)


def build_engine(cfg: NodeConfig, adapter_dir: Path | None = None) -> Engine:
    if pick_engine(cfg, adapter_dir is not None) == "llamacpp":
        from node.native import build_llamacpp

        return build_llamacpp(
            cache_dir=cfg.cache_dir,
            name=cfg.name,
            max_running=cfg.max_running,
            max_queued=cfg.max_queued,
            threads=cfg.threads,
            progress=say,
        )
    return build_hf_engine(cfg, adapter_dir)


def pick_engine(cfg: NodeConfig, adapter: bool) -> str:
    """'hf' or 'llamacpp' for this node; `llamacpp` asked for but impossible is an error, `auto` falls back."""
    from node.loader import ModelLoadError
    from node.native import bundled_gguf, native_problem, self_check

    if cfg.engine == "hf":
        return "hf"
    problem = native_problem(cfg.model, cfg.device, adapter)
    if not problem:
        gguf = bundled_gguf()
        assert gguf is not None
        problem = self_check(gguf)
    if not problem:
        return "llamacpp"
    if cfg.engine == "llamacpp":
        raise ModelLoadError(f"--engine llamacpp: {problem}")
    say(f"engine: torch ({problem})")
    return "hf"


def build_hf_engine(cfg: NodeConfig, adapter_dir: Path | None = None) -> Engine:
    from node.hf import HFEngine
    from node.loader import DEFAULT_MODEL, load_model

    spec: str | None = None if cfg.model == "default" else cfg.model
    name = cfg.name
    if adapter_dir is not None:
        info = json.loads((adapter_dir / "chatbus.json").read_text())
        name = name or info.get("name")
        if info.get("method") == "full":
            spec = str(adapter_dir)
        elif cfg.model == "default" and info.get("base") not in (None, "", "default", DEFAULT_MODEL):
            spec = info["base"]  # the adapter's own base, unless the user named one
    loaded = load_model(
        spec,
        cache_dir=cfg.cache_dir,
        device=cfg.device,
        dtype=cfg.dtype,
        load_8bit=cfg.load_8bit,
        load_4bit=cfg.load_4bit,
        max_gpu_memory=cfg.max_gpu_memory,
        num_gpus=cfg.num_gpus,
        cpu_offloading=cfg.cpu_offloading,
        progress=say,
    )
    if adapter_dir is not None and (adapter_dir / "adapter_config.json").is_file():
        from peft import PeftModel

        say(f"applying adapter {adapter_dir.name}")
        # Merged: serving the adapter then costs nothing extra per token.
        loaded.model = PeftModel.from_pretrained(loaded.model, str(adapter_dir)).merge_and_unload().eval()
    if name:
        loaded = dataclasses.replace(loaded, name=name)
    return HFEngine(
        loaded, max_running=cfg.max_running, max_queued=cfg.max_queued, prefill_chunk=cfg.prefill_chunk
    )


async def serve(cfg: NodeConfig) -> None:
    from node.service import NodeService, new_node_id

    node_id = cfg.node_id or new_node_id()
    nc = await connect(cfg.nats, name=f"chatbus-node {node_id}")  # fail fast before a long load
    try:
        adapter_dir = None
        if cfg.adapter:
            from bus.artifacts import fetch_adapter

            say(f"fetching {cfg.adapter} from the bus")
            adapter_dir = await fetch_adapter(cfg.nats, cfg.adapter, cfg.cache_dir / "adapters")
        engine = await asyncio.to_thread(build_engine, cfg, adapter_dir)
        service = NodeService(nc, engine, node_id=node_id, max_queued=cfg.max_queued)
        await service.start()
        card = engine.card
        say(
            f"{node_id} serving {card.name} on {engine.device} ({engine.dtype}), context {card.context_length}, bus {redact(cfg.nats)}"
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        say(f"{node_id} draining (up to {cfg.drain_timeout:.0f}s)")
        await service.drain(cfg.drain_timeout)
        say(f"{node_id} stopped")
    finally:
        await nc.close()


def main(cfg: NodeConfig) -> int:
    logging.basicConfig(level=logging.DEBUG if cfg.verbose else logging.WARNING, format="[node] %(message)s")
    from node.loader import ModelLoadError

    try:
        asyncio.run(serve(cfg))
    except BusError as e:
        say(f"error: {e}")
        return 2
    except ModelLoadError as e:
        say(f"error: {e}")
        return 3
    except KeyboardInterrupt:
        return 130
    return 0
