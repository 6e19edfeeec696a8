"""Chaos soak: mixed and hostile load through two gateways onto three nodes and a 3-server NATS
cluster, while a schedule kills and restarts nodes, cluster members, gateways and a job worker.

Run:  python bench/chaos.py [--duration 600] [--engine model|echo] [--concurrency 6] [--json FILE]

Loopback only, bounded in time (`--duration`, then in-flight requests get `--request-timeout`) and
stops everything it started. Every request is greedy with a known answer (an undisturbed run of the
same prompt, taken before the first fault), so the check is exact. Faults, one at a time every
`--fault-every` s, cycling: node SIGKILL (restarted), node SIGSTOP (SIGCONT after 4 s), gateway
SIGKILL (restarted), NATS member SIGKILL (restarted after 3 s), node SIGTERM (drains, restarted),
worker SIGKILL (restarted). Meanwhile chat logs and votes are appended (web app's LogStore) and
scripted jobs submitted (bench/chaos_parts.py worker). The report: requests by outcome (hung and
wrong must be 0), hostile requests by outcome, resumes, logs written vs stored, jobs finished, and
memory of every process that lived through the whole run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]  # tests/cluster.py launches clusters

from chaos_load import PROMPTS, TIE_MARGIN, Load, Result, Spec, hostile, margin_of  # noqa: E402
from chaos_parts import SoakJob  # noqa: E402
from cluster import LocalCluster  # noqa: E402

from bus import BusClient  # noqa: E402
from bus.connection import connect  # noqa: E402
from bus.jobs import Jobs  # noqa: E402
from bus.schemas import ChatMessage  # noqa: E402
from bus.schemas_logs import ChatLog, ConvState, VoteLog  # noqa: E402
from bus.server import free_port, stop_process_group  # noqa: E402
from webui.logstore import LogStore  # noqa: E402

FAULTS = ["node-kill", "node-stop", "gateway-kill", "nats-kill", "node-term", "worker-kill"]


class System:
    """Every process of the soak; `argv` per part, restartable under the same name and port."""

    def __init__(self, work: Path, args: argparse.Namespace) -> None:
        self.work, self.args = work, args
        self.cluster = LocalCluster(work / "nats")
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.ports: dict[str, int] = {}
        self.restarts: Counter[str] = Counter()

    def argv(self, name: str) -> list[str]:
        urls, py = self.cluster.urls, sys.executable
        if name.startswith("node"):
            if self.args.engine == "echo":
                return [
                    py,
                    str(ROOT / "bench/chaos_parts.py"),
                    "echo-node",
                    "--nats",
                    urls,
                    "--node-id",
                    name,
                ]
            cache = ["--cache-dir", self.args.cache_dir] if self.args.cache_dir else []
            return [py, "-m", "node", "--model", "default", "--nats", urls, "--node-id", name,
                    "--dtype", self.args.dtype, *cache]  # fmt: skip
        if name.startswith("gw"):
            return [py, "-m", "gateway", "--nats", urls, "--port", str(self.ports[name]), "--log-level", "warning"]  # fmt: skip
        return [py, str(ROOT / "bench/chaos_parts.py"), "worker", "--nats", urls]

    def start(self, name: str) -> None:
        if name.startswith("gw") and name not in self.ports:
            self.ports[name] = free_port()
        with open(self.work / f"{name}.log", "ab") as out:
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            self.procs[name] = subprocess.Popen(
                self.argv(name),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=env,
                start_new_session=True,
            )

    def signal(self, name: str, sig: int) -> None:
        os.killpg(self.procs[name].pid, sig)

    def restart(self, name: str) -> None:
        self.procs[name].wait()
        self.restarts[name] += 1
        self.start(name)

    def gateways(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.ports.values()]

    def rss_mb(self) -> dict[str, float]:
        """RSS of every process of the soak (and of the soak itself), by `name@pid`."""
        pids = [(n, p.pid) for n, p in self.procs.items()] + [("soak", os.getpid())]
        pids += [(s.name, s.process.pid) for s in self.cluster.servers if s.process is not None]
        out = {}
        for name, pid in pids:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                kb = next(int(x.split()[1]) for x in status.splitlines() if x.startswith("VmRSS"))
                out[f"{name}@{pid}"] = kb / 1024
            except (OSError, StopIteration):
                pass
        return out

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGCONT)
            stop_process_group(proc, 15)
        self.cluster.stop()


async def wait_serving(client: BusClient, system: System, model: str, n_nodes: int, timeout: float = 600) -> None:  # fmt: skip
    """Until every node is listed by its current process and every gateway says ok."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=2) as http:
        while time.monotonic() < deadline:
            entry = client.models().get(model)
            pids = {(n.node_id, n.pid) for n in entry.nodes} if entry else set()
            want = {(n, p.pid) for n, p in system.procs.items() if n.startswith("node")}
            healthy = True
            for url in system.gateways():
                try:
                    healthy &= (await http.get(url + "/health")).json()["status"] == "ok"
                except (httpx.HTTPError, ValueError, KeyError):
                    healthy = False
            if want <= pids and len(pids) >= n_nodes and healthy:
                return
            await asyncio.sleep(0.2)
    raise TimeoutError("the system did not come up")


async def faults(system: System, stop_at: float, every: float, log: list[str]) -> None:
    """One fault at a time, cycling through FAULTS, each undone before the next."""
    rng = random.Random(7)
    nodes = [n for n in system.procs if n.startswith("node")]
    i = 0
    while time.monotonic() + every < stop_at:
        await asyncio.sleep(every)
        kind = FAULTS[i % len(FAULTS)]
        i += 1
        t = time.monotonic()
        if kind in ("node-kill", "node-term"):
            name = rng.choice(nodes)
            system.signal(name, signal.SIGKILL if kind == "node-kill" else signal.SIGTERM)
            await asyncio.to_thread(system.restart, name)
        elif kind == "node-stop":
            name = rng.choice(nodes)
            system.signal(name, signal.SIGSTOP)
            await asyncio.sleep(4)
            system.signal(name, signal.SIGCONT)
        elif kind == "gateway-kill":
            name = rng.choice([n for n in system.procs if n.startswith("gw")])
            system.signal(name, signal.SIGKILL)
            await asyncio.sleep(1)
            await asyncio.to_thread(system.restart, name)
        elif kind == "nats-kill":
            server = rng.choice(system.cluster.servers)
            name = server.name
            server.kill()
            await asyncio.sleep(3)
            server.start()
        else:
            name = "worker"
            system.signal(name, signal.SIGKILL)
            await asyncio.to_thread(system.restart, name)
        log.append(f"{t:.1f} {kind} {name}")


async def logs_and_votes(url: str, stop_at: float, tally: Counter[str]) -> None:
    """Append a chat log and a vote every 0.5 s through the web app's LogStore, then count what the
    stream holds (duplicates too: a retried append must be stored once)."""
    client = await BusClient.connect(url, name="chaos-logs")
    store = LogStore(client)
    await store.start()
    run = f"chaos-{os.getpid()}-{int(time.time())}"
    try:
        i = 0
        while time.monotonic() < stop_at:
            conv = f"{run}-{i}"
            messages = [ChatMessage(role="user", content=f"q{i}"), ChatMessage(role="assistant", content="a")]
            now = time.time()
            await store.append(ChatLog(conv_id=conv, model="m", messages=messages, start=now, finish=now))
            state = ConvState(conv_id=conv, model="m", messages=messages)
            await store.append(VoteLog(kind="upvote", tstamp=now, mode="chat", models=["m"], states=[state]))
            tally["logs written"] += 1
            tally["votes written"] += 1
            i += 1
            await asyncio.sleep(0.5)
        deadline = time.monotonic() + 60
        while store.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        seen: Counter[tuple[str, str]] = Counter()
        async for record in client.read_logs():
            conv = record.conv_id if isinstance(record, ChatLog) else record.states[0].conv_id
            if conv.startswith(run):
                seen[(type(record).__name__, conv)] += 1
        tally["logs stored"] = sum(1 for kind, _ in seen if kind == "ChatLog")
        tally["votes stored"] = sum(1 for kind, _ in seen if kind == "VoteLog")
        tally["logs+votes stored twice"] = sum(1 for v in seen.values() if v > 1)
    finally:
        await store.stop()
        await client.close()


async def jobs_through(url: str, stop_at: float, every: float, tally: Counter[str]) -> None:
    """Submit a scripted job every `every` s; at the end, wait for each to finish as submitted."""
    nc = await connect(url, name="chaos-jobs")
    jobs = await Jobs(nc).start()
    submitted: dict[str, str] = {}
    try:
        i = 0
        while time.monotonic() + every < stop_at:
            payload = f"job-{i}"
            try:
                submitted[await jobs.submit("eval", SoakJob(payload=payload, steps=10, step_s=0.3))] = payload
            except Exception as e:  # a submit the bus refused is reported to its user: not lost
                tally["jobs refused at submit"] += 1
                print(f"job submit refused: {e!r}", file=sys.stderr)
            i += 1
            await asyncio.sleep(every)
        tally["jobs submitted"] = len(submitted)
        deadline = time.monotonic() + 120
        left = dict(submitted)
        while left and time.monotonic() < deadline:
            for job_id, payload in list(left.items()):
                record = await jobs.get(job_id)
                if record is not None and record.state == "done":
                    tally["jobs done"] += 1
                    tally["jobs with the right result"] += record.result == {"payload": payload}
                    del left[job_id]
                elif record is not None and record.state in ("failed", "cancelled"):
                    tally[f"jobs {record.state}"] += 1
                    del left[job_id]
            await asyncio.sleep(1)
        tally["jobs unfinished"] = len(left)
    finally:
        await nc.close()


async def clients(load: Load, stop_at: float, concurrency: int, hostile_share: float, tally: Counter[str], notes: list[str]) -> None:  # fmt: skip
    rng = random.Random(11)
    async with httpx.AsyncClient(timeout=httpx.Timeout(load.timeout_s, connect=2)) as http:

        async def worker() -> None:
            while time.monotonic() < stop_at:
                if rng.random() < hostile_share:
                    name, outcome = await hostile(http, load.gateways, load.model, load.timeout_s)
                    tally[f"hostile {outcome}"] += 1
                    if outcome in ("hung", "error5xx") or outcome.startswith("unexpected"):
                        notes.append(f"hostile {name}: {outcome}")
                    continue
                stream = rng.random() < 0.7
                prompt, chat = rng.choice(load.usable)
                spec = Spec(
                    prompt=prompt,
                    chat=chat,
                    stream=stream,
                    hangup=rng.choice([0, 0, 0, 2, 4]) if stream else 0,
                    slow=stream and rng.random() < 0.05,
                )
                try:
                    result = await load.run(http, spec)
                except Exception as e:  # a bug of the soak itself: say so, keep going
                    result = Result("soak-error", detail=f"{spec}: {e!r}")
                tally["sent"] += 1
                tally[result.outcome] += 1
                tally["resumes"] += result.resumed
                tally["resumed and whole"] += bool(result.resumed) and result.outcome == "ok"
                if result.outcome not in ("ok",):
                    notes.append(f"{result.outcome}: {result.detail}")

        await asyncio.gather(*(worker() for _ in range(concurrency)))


async def references(load: Load, tie_margin: float, chat_share: float = 0.6) -> None:
    """Each prompt's answer, chat and completion, from the undisturbed system, with the top two
    logprobs of every step: a prompt whose answer has a near tie is not used (chaos_load.TIE_MARGIN).
    Chats stay ~`chat_share` of the usable pairs, as in the load."""
    async with httpx.AsyncClient(timeout=300) as http:
        for i in range(len(PROMPTS)):
            for chat in (True, False):
                body = load.body(Spec(prompt=i, chat=chat, stream=False))
                body.update({"logprobs": True, "top_logprobs": 2} if chat else {"logprobs": 2})
                r = await http.post(load.gateways[0] + ("/v1/chat/completions" if chat else "/v1/completions"), json=body)  # fmt: skip
                r.raise_for_status()
                choice = r.json()["choices"][0]
                load.references[(i, chat)] = choice["message"]["content"] if chat else choice["text"]
                load.margins[(i, chat)] = margin_of(choice, chat)
    clear = [k for k, m in load.margins.items() if m >= tie_margin]
    chats, texts = [k for k in clear if k[1]], [k for k in clear if not k[1]]
    if not chats or not texts:
        raise SystemExit(
            f"every prompt's answer has a near tie (margins {load.margins}): no exact check possible"
        )
    load.usable = chats * round(chat_share * 10) + texts * round((1 - chat_share) * 10)


async def soak(args: argparse.Namespace) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="chatbus-chaos-"))
    system = System(work, args)
    system.cluster.start()
    model = "echo" if args.engine == "echo" else "SmolLM2-135M-Instruct"
    tally: Counter[str] = Counter()
    notes: list[str] = []
    fault_log: list[str] = []
    try:
        await system.cluster.wait_ready()
        for name in ("node-1", "node-2", "node-3", "gw-1", "gw-2", "worker"):
            system.start(name)
        watcher = await BusClient.connect(system.cluster.urls, name="chaos-watch")
        try:
            await wait_serving(watcher, system, model, 3)
        finally:
            await watcher.close()
        load = Load(system.gateways(), model, args.max_tokens, args.request_timeout)
        await references(load, args.tie_margin)
        began = time.monotonic()
        stop_at = began + args.duration
        samples: dict[str, list[float]] = {}
        await asyncio.gather(
            clients(load, stop_at, args.concurrency, args.hostile, tally, notes),
            faults(system, stop_at, args.fault_every, fault_log),
            logs_and_votes(system.cluster.urls, stop_at, tally),
            jobs_through(system.cluster.urls, stop_at, args.job_every, tally),
            memory(system, stop_at, samples),
        )
        return {
            "seconds": round(time.monotonic() - began, 1),
            "engine": args.engine,
            "prompts": _prompt_table(load, args.tie_margin),
            "tally": dict(sorted(tally.items())),
            "faults": fault_log,
            "restarts": dict(system.restarts),
            # Every process that lived 2 minutes or more: RSS a minute into its life, then at its end.
            "rss_mb": {
                k: [round(v[2], 1), round(v[-1], 1)] for k, v in sorted(samples.items()) if len(v) >= 8
            },
            "notes": notes[:50],
        }
    finally:
        system.stop()


def _prompt_table(load: Load, tie_margin: float) -> list[str]:
    """One line per (prompt, chat): its smallest top-two gap and whether the soak used it."""
    return [
        f"{'chat' if chat else 'text'} {PROMPTS[i]!r}: margin {m:.4f} {'used' if m >= tie_margin else 'NOT USED (near tie)'}"
        for (i, chat), m in sorted(load.margins.items())
    ]


async def memory(system: System, stop_at: float, samples: dict[str, list[float]]) -> None:
    """RSS of every process (and of this soak) every 15 s, per process instance."""
    while time.monotonic() < stop_at:
        for name, mb in system.rss_mb().items():
            samples.setdefault(name, []).append(mb)
        await asyncio.sleep(15)


def report(result: dict[str, object]) -> None:
    tally = result["tally"]
    assert isinstance(tally, dict)
    print(f"chaos soak: {result['seconds']} s, engine {result['engine']}, {len(result['faults'])} faults")  # type: ignore[arg-type]
    for key, value in tally.items():
        print(f"  {key:<28} {value}")
    print("  restarts: " + ", ".join(f"{k} x{v}" for k, v in result["restarts"].items()))  # type: ignore[attr-defined]
    print("  RSS MB (a minute in -> end) of every process that lived 2 minutes or more:")
    for name, (a, b) in result["rss_mb"].items():  # type: ignore[attr-defined]
        print(f"    {name:<24} {a:>7.1f} -> {b:>7.1f}")
    for line in result["prompts"]:  # type: ignore[attr-defined]
        print(f"  {line}")
    for note in result["notes"]:  # type: ignore[attr-defined]
        print(f"  ! {note}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=600)
    p.add_argument("--engine", choices=["model", "echo"], default="model")
    p.add_argument("--concurrency", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--hostile", type=float, default=0.15, help="share of requests that are hostile")
    p.add_argument("--fault-every", type=float, default=15)
    p.add_argument("--job-every", type=float, default=5)
    p.add_argument("--request-timeout", type=float, default=120)
    p.add_argument(
        "--tie-margin",
        type=float,
        default=TIE_MARGIN,
        help="use only prompts whose answers have no closer top two (nats)",
    )
    p.add_argument("--dtype", default="float32", help="the nodes' --dtype (model engine)")
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "chatbus-test"))
    p.add_argument("--json", default="", help="also write the result here")
    args = p.parse_args()
    result = asyncio.run(soak(args))
    report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
