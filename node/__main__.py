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
        "--adapter",
        default=None,
        help="serve a model trained on the bus: a train job id or a stored `models/<digest>` artifact",
    )
    p.add_argument("--nats", default=os.environ.get("CHATBUS_NATS", "nats://127.0.0.1:4222"), help="NATS URL")
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
    a = p.parse_args(argv)
    from bus.paths import default_cache_dir

    return NodeConfig(
        model=a.model,
        name=a.name,
        adapter=a.adapter,
        nats=a.nats,
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
        engine=a.engine,
        threads=a.threads,
        node_id=a.node_id,
        cache_dir=a.cache_dir or default_cache_dir() / "models",
        drain_timeout=a.drain_timeout,
        verbose=a.verbose,
    )


if __name__ == "__main__":
    sys.exit(main(parse()))
