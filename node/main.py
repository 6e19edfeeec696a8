"""Run a node: load the model, join the bus, serve until a signal, then drain and deregister."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from bus.auth import redact
from bus.connection import connect
from bus.errors import BusError
from bus.logfmt import bind, setup_logging
from bus.paths import DEFAULT_NATS
from bus.tokens import creds_in
from node.engine import Engine

__all__ = ["NodeConfig", "main", "serve"]

log = logging.getLogger("node")


@dataclass(frozen=True)
class NodeConfig:
    model: str = "default"
    name: str | None = None
    aliases: tuple[str, ...] = ()  # more names of the same model (`--model-names a,b`: b)
    extra_models: tuple[tuple[str, str], ...] = ()  # further `--model`s: (model, its --model-names)
    adapter: str | None = None  # a train job id or a `models/<digest>` artifact
    max_adapters: int = 8  # LoRA adapters served per row beside the base (node/lora.py)
    serve_adapters: bool = False  # load each train job of our base that finishes (node/adapter_host.py)
    nats: str = DEFAULT_NATS
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
    kv_cache_memory: str = "auto"  # bytes ("2GiB") or a fraction of RAM ("0.25"); auto: a quarter
    engine: str = "hf"  # auto | hf | llamacpp (node/native.py)
    threads: int | None = None  # the engine's compute threads (torch's default: torch_threads())
    node_id: str | None = None
    cache_dir: Path = Path(".cache/chatbus/models")
    drain_timeout: float = 30.0
    verbose: bool = False
    log_format: str = "text"  # or json (bus.logfmt): one object a line, with request ids


def torch_threads(engines: int = 1) -> int:
    """The torch engine's default threads on CPU: every core but one, shared by this process's
    `engines`. The node's event loop (a NATS publish per token) and, under `chatbus up`, the
    nats-server and gateway need a core each token; an OpenMP team that wants every core waits at
    each barrier for whichever was preempted. On 2 cores one thread gives more through the gateway at
    1 and at 16 streams (docs/benchmarks.md). Engines split the rest: teams that together hold more
    threads than cores make libgomp throttle them all (bench/omp_team.py)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, (cores - 1) // max(1, engines))


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
    from bus.artifacts import describe
    from node.hf import HFEngine
    from node.loader import DEFAULT_MODEL, load_model
    from node.packing import one_thread

    spec: str | None = None if cfg.model == "default" else cfg.model
    name = cfg.name
    if adapter_dir is not None:
        info = describe(adapter_dir)
        name = name or info.name
        if info.method == "full":
            spec = str(adapter_dir)
        elif cfg.model == "default" and info.base not in ("", "default", DEFAULT_MODEL):
            spec = info.base  # the adapter's own base, unless the user named one
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
        with one_thread():  # no OpenMP team outside the engine's worker thread (node/packing.py)
            loaded.model = PeftModel.from_pretrained(loaded.model, str(adapter_dir)).merge_and_unload().eval()
    base = loaded.name
    if name:
        loaded = dataclasses.replace(loaded, name=name)
    engine = HFEngine(
        loaded,
        max_running=cfg.max_running,
        max_queued=cfg.max_queued,
        prefill_chunk=cfg.prefill_chunk,
        kv_cache_memory=cfg.kv_cache_memory,
        threads=cfg.threads or (torch_threads(1 + len(cfg.extra_models)) if loaded.device == "cpu" else None),
    )
    engine.adapters.base = base  # what a LoRA must have been trained on, whatever --name says
    engine.adapters.max_adapters = cfg.max_adapters
    return engine


@dataclass
class _Part:
    """One model this process serves: its engine's bus service and adapter host."""

    service: Any  # node.service.NodeService
    host: Any  # node.adapter_host.AdapterHost


async def _serve_one(cfg: NodeConfig, nc: Any, node_id: str, adapter_dir: Path | None) -> _Part:
    """Load `cfg.model`, check the credential allows its names, and start serving it as `node_id`."""
    from node.adapter_host import AdapterHost
    from node.service import NodeService

    creds = creds_in(cfg.nats)
    engine = await asyncio.to_thread(build_engine, cfg, adapter_dir)
    for served in (engine.card.name, *cfg.aliases):
        if creds and creds.models is not None and served not in creds.models:
            raise BusError(
                f"credential {creds.name} may serve {', '.join(creds.models)}, not {served!r}: "
                f"pass --name, or ask the operator for a credential with that model"
            )
    service = NodeService(nc, engine, node_id=node_id, max_queued=cfg.max_queued)
    bind(node=node_id, model=engine.card.name)  # every log line of this model's tasks says so
    await service.start()
    for alias in cfg.aliases:
        await service.serve_model(msgspec.structs.replace(engine.card, name=alias), alias=True)
    may_serve = creds.models if creds else None
    host = AdapterHost(
        service, cache_dir=cfg.cache_dir / "adapters", serve_new=cfg.serve_adapters, may_serve=may_serve
    )
    await host.start()
    card = engine.card
    names = ", ".join((card.name, *cfg.aliases))
    say(
        f"{node_id} serving {names} on {engine.device} ({engine.dtype}), context {card.context_length}, bus {redact(cfg.nats)}"
    )
    return _Part(service, host)


def _more(cfg: NodeConfig) -> list[tuple[str, NodeConfig]]:
    """(node id suffix, config) of each further `--model` of this process."""
    out = []
    for i, (spec, names) in enumerate(cfg.extra_models, start=1):
        given = [n.strip() for n in names.split(",") if n.strip()]
        more = dataclasses.replace(
            cfg, model=spec, name=given[0] if given else None, aliases=tuple(given[1:]), adapter=None
        )
        out.append((f"-{i}", more))
    return out


async def serve(cfg: NodeConfig) -> None:
    from node.service import new_node_id

    creds = creds_in(cfg.nats)  # a credential of its own: the node id is its name
    if creds and cfg.node_id not in (None, creds.name):
        raise BusError(f"with credential {creds.name} the node id is {creds.name!r}: leave out --node-id")
    if creds and cfg.extra_models:
        raise BusError(f"credential {creds.name} is one node id: run one node process per model with it")
    node_id = cfg.node_id or (creds.name if creds else new_node_id())
    revoked = asyncio.Event()
    nc = await connect(
        cfg.nats, name=f"chatbus-node {node_id}", on_refused=revoked.set
    )  # fail fast before a long load
    try:
        adapter_dir = None
        if cfg.adapter:
            from bus.artifacts import fetch_adapter

            say(f"fetching {cfg.adapter} from the bus")
            adapter_dir = await fetch_adapter(cfg.nats, cfg.adapter, cfg.cache_dir / "adapters")
        parts = [await _serve_one(cfg, nc, node_id, adapter_dir)]
        for suffix, more in _more(cfg):  # FastChat's multi-model worker: a node id per model
            parts.append(await _serve_one(more, nc, node_id + suffix, None))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        waits = [asyncio.ensure_future(e.wait()) for e in (stop, revoked)]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for waiting in waits:
            waiting.cancel()
        for part in parts:
            await part.host.stop()
        if revoked.is_set():  # `chatbus node-token revoke`: nothing to drain to, the bus is gone for us
            await asyncio.gather(*(part.service.drain(0) for part in parts))
            raise BusError(f"{node_id}: the bus refuses this node's credential now (revoked?); stopped")
        say(f"{node_id} draining (up to {cfg.drain_timeout:.0f}s)")
        await asyncio.gather(*(part.service.drain(cfg.drain_timeout) for part in parts))
        say(f"{node_id} stopped")
    finally:
        with contextlib.suppress(ConnectionError):  # nats-py, closing while a refused reconnect dies
            await nc.close()


def main(cfg: NodeConfig) -> int:
    quiet = logging.INFO if cfg.log_format == "json" else logging.WARNING  # JSON: a line per request
    setup_logging(logging.DEBUG if cfg.verbose else quiet, cfg.log_format, "[node] %(message)s")
    from node.loader import ModelLoadError

    try:
        asyncio.run(serve(cfg))
    except ModelLoadError as e:  # a BusError too: keep it first, it has its own exit code
        say(f"error: {e}")
        return 3
    except BusError as e:
        say(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
