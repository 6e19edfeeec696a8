"""`python -m node`: serve one model on the bus."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from bus.paths import add_nats_option, resolve_nats
from node.main import NodeConfig, main


def parse(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> NodeConfig:
    """The node's options; `environ` (default: this process's) gives $CHATBUS_NATS, $CHATBUS_CREDS, ..."""
    env = os.environ if environ is None else environ
    p = argparse.ArgumentParser(prog="python -m node", description="Serve a model on the chatbus bus.")
    p.add_argument(
        "--model",
        action="append",
        default=None,
        help="local model dir, hub id, or 'default' (SmolLM2-135M-Instruct); repeat to serve several from "
        "one process (each its own engine and node id)",
    )
    p.add_argument("--name", default=None, help="serve the model under this name (default: from the model)")
    p.add_argument(
        "--model-names",
        action="append",
        default=None,
        help="comma-separated names to serve the model under (FastChat's --model-names): the first is "
        "its name, the others aliases; repeat once per --model",
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
    add_nats_option(p)
    p.add_argument(
        "--creds",
        type=Path,
        default=env.get("CHATBUS_CREDS"),
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
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="the engine's compute threads on CPU (default: torch every core but one, which the bus "
        "path needs; llama.cpp every core)",
    )
    p.add_argument("--node-id", default=None)
    p.add_argument("--cache-dir", type=Path, default=None, help="where converted models are kept")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds to finish answers on shutdown")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument(
        "--log-format",
        choices=["text", "json"],
        default=env.get("CHATBUS_LOG_FORMAT", "text"),
        help="json: one object a line, a line per request ($CHATBUS_LOG_FORMAT)",
    )
    a = p.parse_args(argv)
    from bus.paths import default_cache_dir
    from bus.tokens import with_creds

    # with a credential and no URL, the URL comes from the credential file
    nats = with_creds(a.nats or env.get("CHATBUS_NATS"), a.creds) if a.creds else resolve_nats(a.nats, env)

    models = a.model or ["default"]
    per_model = a.model_names or []
    if len(per_model) > len(models):
        p.error(f"{len(per_model)} --model-names for {len(models)} --model: give one per model")
    per_model += [""] * (len(models) - len(per_model))
    names = [n.strip() for n in per_model[0].split(",") if n.strip()]
    if names and a.name and a.name != names[0]:
        p.error("--name and --model-names disagree on the model's name: give one of them")
    if len(models) > 1 and (a.name or a.adapter):
        p.error("--name and --adapter apply to one model: with several --model, use --model-names")
    return NodeConfig(
        model=models[0],
        extra_models=tuple(zip(models[1:], per_model[1:], strict=True)),
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
