"""Load generator: streaming chat requests through the gateway at several concurrency levels, vs the engine.

Run:  python bench/load.py [--concurrency 1,4,8] [--max-tokens 64] [--gateway URL --api-key K --model M]

With no --gateway it starts its own system: an embedded nats-server, `python -m node` with the default model
and `python -m gateway`. Each level keeps `c` requests in flight (closed loop) until `--requests` (default
2·c, at least 4) have finished. Every request is greedy with the same prompts, so gateway and engine produce
the same tokens. Then (unless --no-engine, and when node/hf.py imports) the node is stopped and the same
workload runs on HFEngine in-process, so gateway + bus overhead is a measured ratio.

Reported per level: TTFT (request sent → first content), ITL (mean inter-token latency of each request:
(last − first content) / (tokens − 1)), E2E latency, each p50/p90/p99 over requests, and aggregate output
tokens/s (all completion tokens / wall time of the level). A second table (Linux only) gives the CPU time
each process spent per request during the level — node (or the in-process engine), gateway, nats-server,
this load client — and "other": CPU the rest of the machine used meanwhile, so a contended run shows.
A third (own system only) counts the token-stream messages the node stored per request and per output
token: token coalescing at work (at most one message per request per decode step, plus its Done).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

QUESTIONS = [
    "Write a long story about a lighthouse keeper.",
    "Explain how a steam engine works, step by step.",
    "Describe the history of Paris in detail.",
    "List ideas for a birthday party and explain each one.",
]


@dataclass
class Sample:
    ttft: float
    itl: float
    e2e: float
    tokens: int


Run = Callable[[int], Awaitable[Sample]]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def level(run: Run, concurrency: int, requests: int) -> tuple[list[Sample], float]:
    """Keep `concurrency` requests in flight until `requests` are done; samples and wall seconds."""
    counter = iter(range(requests))
    samples: list[Sample] = []

    async def worker() -> None:
        for i in counter:
            samples.append(await run(i))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return samples, time.perf_counter() - started


# ----------------------------------------------------------------------------- CPU accounting (Linux /proc)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads; nan where /proc is missing."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return math.nan


def machine_busy_seconds() -> float:
    """CPU seconds every core of the machine spent not idle since boot; nan where /proc is missing."""
    try:
        ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return math.nan


def cpu_snapshot(pids: dict[str, int]) -> dict[str, float]:
    return {"machine": machine_busy_seconds()} | {name: cpu_seconds(pid) for name, pid in pids.items()}


def cpu_row(mode: str, c: int, requests: int, before: dict[str, float], after: dict[str, float]) -> str:
    """CPU ms per request for each process, and for everything else on the machine ("other")."""
    used = {name: (after[name] - before[name]) * 1000 / requests for name in before}
    ours = sum(v for name, v in used.items() if name != "machine")
    cells = [used.get(name, math.nan) for name in CPU_COLUMNS] + [used["machine"] - ours]
    return f"| {mode} | {c} | " + " | ".join("-" if math.isnan(v) else f"{v:.0f}" for v in cells) + " |"


CPU_COLUMNS = ["node", "gateway", "nats-server", "client"]
CPU_HEADER = (
    "| mode | conc | CPU ms/req: node | gateway | nats-server | load client | other |\n"
    "|---|---|---|---|---|---|---|"
)


# ----------------------------------------------------------------------------- through the gateway


def gateway_runner(http: httpx.AsyncClient, model: str, max_tokens: int) -> Run:
    async def run(i: int) -> Sample:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        sent = time.perf_counter()
        first = last = 0.0
        tokens = 0
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"gateway answered {r.status_code}: {(await r.aread()).decode()}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(f"stream failed: {chunk['error']}")
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    last = time.perf_counter()
                    first = first or last
        return _sample(sent, first, last, tokens)

    return run


def _sample(sent: float, first: float, last: float, tokens: int) -> Sample:
    itl = (last - first) / (tokens - 1) if tokens > 1 else 0.0
    return Sample(ttft=first - sent, itl=itl, e2e=last - sent, tokens=tokens)


# ----------------------------------------------------------------------------- the engine in-process


def engine_runner(engine: object, max_tokens: int) -> Run:
    from bus.schemas import ChatMessage, SamplingParams
    from node.engine import Delta, EngineRequest

    loop = asyncio.get_running_loop()
    params = SamplingParams(temperature=0, max_tokens=max_tokens)

    async def run(i: int) -> Sample:
        done: asyncio.Future[None] = loop.create_future()
        marks = {"first": 0.0, "last": 0.0, "tokens": 0}

        def on_delta(delta: Delta) -> None:  # engine thread → loop
            now = time.perf_counter()
            if delta.text:
                marks["last"] = now
                marks["first"] = marks["first"] or now
            if delta.finish_reason is not None:
                marks["tokens"] = delta.completion_tokens
                if not done.done():
                    done.set_result(None)

        messages = [ChatMessage(role="user", content=QUESTIONS[i % len(QUESTIONS)])]
        sent = time.perf_counter()
        request = EngineRequest(request_id=f"bench-{i}-{sent}", messages=messages, params=params)
        engine.submit(request, lambda d: loop.call_soon_threadsafe(on_delta, d))  # type: ignore[attr-defined]
        await done
        return _sample(sent, marks["first"], marks["last"], int(marks["tokens"]))

    return run


# ----------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True, env=env
        )


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def wait_ready(http: httpx.AsyncClient, model: str | None, procs: list[subprocess.Popen[bytes]]) -> str:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a process exited early; see the logs")
        try:
            data = (await http.get("/v1/models")).json()["data"]
            if data and (model is None or model in {m["id"] for m in data}):
                return model or data[0]["id"]
        except (httpx.HTTPError, KeyError):
            pass
        await asyncio.sleep(0.5)
    raise RuntimeError("the gateway never listed a model")


# ----------------------------------------------------------------------------- main


def row(mode: str, c: int, samples: list[Sample], wall: float) -> str:
    def trio(values: list[float], scale: float, fmt: str) -> str:
        return "/".join(format(pct(values, q) * scale, fmt) for q in (0.5, 0.9, 0.99))

    tokens = sum(s.tokens for s in samples)
    return (
        f"| {mode} | {c} | {len(samples)} | {trio([s.ttft for s in samples], 1000, '.0f')} "
        f"| {trio([s.itl for s in samples], 1000, '.1f')} | {trio([s.e2e for s in samples], 1, '.2f')} "
        f"| {tokens / wall:.1f} |"
    )


HEADER = (
    "| mode | conc | reqs | TTFT ms p50/p90/p99 | ITL ms p50/p90/p99 | E2E s p50/p90/p99 | out tok/s |\n"
    "|---|---|---|---|---|---|---|"
)


Count = Callable[[], Awaitable[int]]


async def measure(
    run: Run,
    mode: str,
    levels: list[int],
    requests: int | None,
    pids: dict[str, int],
    messages: Count | None = None,
) -> list[str]:
    """Run each level, print its latency row; return the CPU rows (printed after the table), and
    with `messages` (token-stream messages stored so far) one coalescing row per level."""
    await level(run, max(levels), max(levels))  # warm-up: new batch shapes are slow the first time
    cpu_rows, bus_rows = [], []
    for c in levels:
        before = cpu_snapshot(pids)
        stored = await messages() if messages else 0
        samples, wall = await level(run, c, requests or max(4, 2 * c))
        cpu_rows.append(cpu_row(mode, c, len(samples), before, cpu_snapshot(pids)))
        print(row(mode, c, samples, wall), flush=True)
        if messages:
            sent, tokens = await messages() - stored, sum(s.tokens for s in samples)
            bus_rows.append(
                f"| {c} | {sent / len(samples):.1f} | {tokens / len(samples):.1f} | {sent / max(1, tokens):.3f} |"
            )
    if bus_rows:
        print(f"\n{BUS_HEADER}", *bus_rows, sep="\n", flush=True)
    return cpu_rows


BUS_HEADER = (
    "| conc | token-stream messages / request | output tokens / request | messages / token |\n"
    "|---|---|---|---|"
)


def stored_messages(nats_url: str) -> Count:
    """Messages in the token stream so far: how many a node published (one per request per decode
    step at most, plus the final Done)."""
    from bus import subjects
    from bus.connection import connect

    async def count() -> int:
        nc = await connect(nats_url, name="load-counter")
        try:
            return int((await nc.jetstream().stream_info(subjects.TOKENS_STREAM)).state.messages)
        finally:
            await nc.close()

    return count


async def main(args: argparse.Namespace) -> None:
    levels = [int(x) for x in args.concurrency.split(",")]
    work = Path(tempfile.mkdtemp(prefix="chatbus-load-"))
    procs: list[subprocess.Popen[bytes]] = []
    server = None
    url = args.gateway
    pids = {"client": os.getpid()}
    try:
        if url is None:
            from bus.server import EmbeddedServer

            server = EmbeddedServer(data_dir=work / "js", port=0, log_file=work / "nats.log")
            server.start()
            node = [sys.executable, "-m", "node", "--nats", server.url, "--max-running", str(max(levels))]
            node += ["--cache-dir", str(args.cache_dir)] if args.cache_dir else []
            procs.append(spawn([*node, "--model", args.engine_model], work / "node.log"))
            pids["node"] = procs[-1].pid
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            gw = [sys.executable, "-m", "gateway", "--nats", server.url, "--port", str(port)]
            procs.append(spawn([*gw, "--max-n", "64"], work / "gateway.log"))
            pids["gateway"] = procs[-1].pid
            if server.process is not None:
                pids["nats-server"] = server.process.pid
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        limits = httpx.Limits(max_connections=max(levels) * 2)
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600, limits=limits) as http:
            model = await wait_ready(http, args.model, procs)
            print(f"gateway {url}, model {model}, max_tokens {args.max_tokens}, logs in {work}\n")
            print(HEADER, flush=True)
            runner = gateway_runner(http, model, args.max_tokens)
            counter = stored_messages(server.url) if server is not None else None
            cpu_rows = await measure(runner, "gateway", levels, args.requests, pids, counter)
        for proc in procs:
            stop(proc)
        if not args.no_engine:
            cpu_rows += await engine_part(args, levels)
        print(f"\n{CPU_HEADER}", *cpu_rows, sep="\n", flush=True)
    finally:
        for proc in procs:
            if proc.poll() is None:
                stop(proc)
        if server is not None:
            server.stop()


async def engine_part(args: argparse.Namespace, levels: list[int]) -> list[str]:
    try:
        from node.hf import HFEngine
        from node.loader import load_model
    except ImportError as e:
        print(f"\n(engine comparison skipped: {e})")
        return []
    from bus.paths import default_cache_dir

    cache = args.cache_dir or default_cache_dir() / "models"
    spec = None if args.engine_model == "default" else args.engine_model
    loaded = await asyncio.to_thread(load_model, spec, cache_dir=cache, progress=lambda _: None)
    engine = HFEngine(loaded, max_running=max(levels))
    engine.start()
    try:  # the engine runs in this process: its CPU is the "node" column
        return await measure(
            engine_runner(engine, args.max_tokens), "engine", levels, args.requests, {"node": os.getpid()}
        )
    finally:
        engine.stop()


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gateway", default=None, help="an existing gateway URL (default: start a system)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--model", default=None, help="model name (default: the first one served)")
    p.add_argument("--engine-model", default="default", help="what the node / in-process engine loads")
    p.add_argument("--cache-dir", type=Path, default=None, help="converted-model cache (as python -m node)")
    p.add_argument("--concurrency", default="1,4,8")
    p.add_argument("--requests", type=int, default=None, help="requests per level (default: max(4, 2·c))")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--no-engine", action="store_true", help="skip the in-process engine comparison")
    return p.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse()))
