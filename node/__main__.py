"""`python -m node`: serve one model on the bus."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from node.main import NodeConfig, main


def parse(argv: list[str] | None = None) -> NodeConfig:
    p = argparse.ArgumentParser(prog="python -m node", description="Serve a model on the chatbus bus.")
    p.add_argument(
        "--model", default="default", help="local model dir, hub id, or 'default' (SmolLM2-135M-Instruct)"
    )
    p.add_argument("--name", default=None, help="serve the model under this name (default: from the model)")
    p.add_argument(
        "--model-names",
        default=None,
        help="comma-separated names to serve the model under (FastChat's --model-names): the first is "
        "its name, the others aliases",
    )
    p.add_argument(
        "--adapter",
        default=None,
        help="serve a model trained on the bus: a train job id or a stored `models/<digest>` artifact",
    )
    p.add_argument(
        "--max-adapters",
        type=int,
        default=8,
        help="LoRA adapters served beside the base, per row of one batch (`chatbus adapters load`); "
        "loading one more evicts the least recently used idle one",
    )
    p.add_argument(
        "--serve-adapters",
        action="store_true",
        help="load the LoRA of every train job of this node's base that finishes (on in `chatbus up`)",
    )
    p.add_argument("--nats", default=os.environ.get("CHATBUS_NATS"), help="NATS URL")
    p.add_argument(
        "--creds",
        type=Path,
        default=os.environ.get("CHATBUS_CREDS"),
        help="this node's credential file (`chatbus node-token create`); its name is the node id",
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps", "xpu", "npu"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--load-8bit", action="store_true", help="8-bit weights (bitsandbytes)")
    p.add_argument("--load-4bit", action="store_true", help="4-bit NF4 weights (bitsandbytes)")
    p.add_argument("--num-gpus", type=int, default=None)
    p.add_argument("--max-gpu-memory", default=None, help="per GPU, e.g. 20GiB")
    p.add_argument(
        "--cpu-offloading", action="store_true", help="offload what does not fit on the GPU to CPU"
    )
    p.add_argument("--max-running", type=int, default=16, help="sequences decoded together")
    p.add_argument("--max-queued", type=int, default=64, help="requests waiting beyond that before rejecting")
    p.add_argument(
        "--prefill-chunk",
        type=int,
        default=128,
        help="prompt tokens per prefill forward (a group of prompts, padding included, or a chunk of a "
        "long one): running streams wait at most one such forward between two tokens",
    )
    p.add_argument(
        "--kv-cache-memory",
        type=_memory,
        default="auto",
        help="KV cache budget, running rows and prefix cache together: bytes (2GiB, 512MB) or a fraction "
        "of RAM (0.25, the default 'auto'); when full, new requests wait, or are rejected busy if they "
        "could never fit",
    )
    p.add_argument(
        "--engine",
        default="hf",
        choices=["auto", "hf", "llamacpp"],
        help="hf: transformers (any model, GPU, adapters); llamacpp: the bundled GGUF on llama.cpp (CPU); "
        "auto: llamacpp where it can run and passes a self-check, else hf",
    )
    p.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: every core)")
    p.add_argument("--node-id", default=None)
    p.add_argument("--cache-dir", type=Path, default=None, help="where converted models are kept")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds to finish answers on shutdown")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument(
        "--log-format",
        choices=["text", "json"],
        default=os.environ.get("CHATBUS_LOG_FORMAT", "text"),
        help="json: one object a line, a line per request ($CHATBUS_LOG_FORMAT)",
    )
    a = p.parse_args(argv)
    from bus.paths import DEFAULT_NATS, default_cache_dir
    from bus.tokens import with_creds

    nats = with_creds(a.nats, a.creds) if a.creds else a.nats or DEFAULT_NATS

    names = [n.strip() for n in (a.model_names or "").split(",") if n.strip()]
    if names and a.name and a.name != names[0]:
        p.error("--name and --model-names disagree on the model's name: give one of them")
    return NodeConfig(
        model=a.model,
        name=a.name or (names[0] if names else None),
        aliases=tuple(dict.fromkeys(names[1:])),
        adapter=a.adapter,
        max_adapters=a.max_adapters,
        serve_adapters=a.serve_adapters,
        nats=nats,
        device=a.device,
        dtype=a.dtype,
        load_8bit=a.load_8bit,
        load_4bit=a.load_4bit,
        num_gpus=a.num_gpus,
        max_gpu_memory=a.max_gpu_memory,
        cpu_offloading=a.cpu_offloading,
        max_running=a.max_running,
        max_queued=a.max_queued,
        prefill_chunk=a.prefill_chunk,
        kv_cache_memory=a.kv_cache_memory,
        engine=a.engine,
        threads=a.threads,
        node_id=a.node_id,
        cache_dir=a.cache_dir or default_cache_dir() / "models",
        drain_timeout=a.drain_timeout,
        verbose=a.verbose,
        log_format=a.log_format,
    )


def _memory(value: str) -> str:
    from node.kvcache import memory_budget

    try:
        memory_budget(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


if __name__ == "__main__":
    sys.exit(main(parse()))
