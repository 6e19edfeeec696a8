"""Run a node: load the model, join the bus, serve until a signal, then drain and deregister."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from bus.connection import connect
from bus.errors import BusUnavailable
from node.engine import Engine

__all__ = ["NodeConfig", "main", "serve"]

log = logging.getLogger("node")


@dataclass(frozen=True)
class NodeConfig:
    model: str = "default"
    name: str | None = None
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
    node_id: str | None = None
    cache_dir: Path = Path(".cache/chatbus/models")
    drain_timeout: float = 30.0
    verbose: bool = False


def say(line: str) -> None:
    print(f"[node] {line}", file=sys.stderr, flush=True)


def build_engine(cfg: NodeConfig) -> Engine:
    from node.hf import HFEngine
    from node.loader import load_model

    loaded = load_model(
        None if cfg.model == "default" else cfg.model,
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
    if cfg.name:
        loaded = dataclasses.replace(loaded, name=cfg.name)
    return HFEngine(loaded, max_running=cfg.max_running, max_queued=cfg.max_queued)


async def serve(cfg: NodeConfig) -> None:
    from node.service import NodeService, new_node_id

    node_id = cfg.node_id or new_node_id()
    nc = await connect(cfg.nats, name=f"chatbus-node {node_id}")  # fail fast before a long load
    try:
        engine = await asyncio.to_thread(build_engine, cfg)
        service = NodeService(nc, engine, node_id=node_id, max_queued=cfg.max_queued)
        await service.start()
        card = engine.card
        say(
            f"{node_id} serving {card.name} on {engine.device} ({engine.dtype}), context {card.context_length}, bus {cfg.nats}"
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
    except BusUnavailable as e:
        say(f"error: {e}")
        return 2
    except ModelLoadError as e:
        say(f"error: {e}")
        return 3
    except KeyboardInterrupt:
        return 130
    return 0
