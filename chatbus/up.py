"""`chatbus up`: an embedded nats-server plus a node per model, the gateway and the web UI, supervised.

Children are plain `python -m <package>` processes in their own process groups: Ctrl-C reaches this
supervisor only, which stops them in order (front ends, then nodes, which drain and deregister,
then the server) so nothing is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bus.auth import ROLES, provision, redact, with_credential
from bus.client import BusClient
from bus.connection import connect
from bus.errors import BusUnavailable
from bus.paths import clear_nats_url, write_nats_url
from bus.server import EmbeddedServer, stop_process_group
from bus.setup import prepare_bus
from node.service import new_node_id

__all__ = ["Child", "UpConfig", "run_up"]

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class UpConfig:
    models: list[str]
    nats: str | None  # None: start the embedded server
    state_dir: Path
    cache_dir: Path
    nats_port: int = 4222
    nats_host: str = "127.0.0.1"  # 0.0.0.0: nodes on other machines join (with a credential of their own)
    gateway: bool = True
    gateway_host: str = "127.0.0.1"
    gateway_port: int = 8000
    web: bool = True
    web_host: str = "127.0.0.1"
    web_port: int = 8080
    api_keys: list[str] = field(default_factory=list)
    node_args: list[str] = field(default_factory=list)
    trainer: bool = False
    judge: bool = False
    ready_timeout: float = 300.0
    auth: bool = True  # the embedded server asks every part for its role's credential


@dataclass
class Child:
    """One supervised process; restarted (with backoff) if it dies on its own."""

    label: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)  # secrets travel here, never in argv
    process: subprocess.Popen[bytes] | None = None
    node_id: str = ""
    restarts: int = 0
    stopping: bool = False

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, **self.env},
            )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float) -> None:
        self.stopping = True
        if self.process is not None:
            stop_process_group(self.process, timeout)

    def tail(self, lines: int = 8) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def say(line: str) -> None:
    print(f"chatbus: {line}", flush=True)


def _children(cfg: UpConfig, urls: dict[str, str]) -> tuple[list[Child], list[Child]]:
    """(nodes, front ends) to start, each with its log file under the state dir and the bus URL of
    its role (`urls`, with that role's credential) in $CHATBUS_NATS."""
    py = sys.executable
    logs = cfg.state_dir / "logs"

    def bus(role: str) -> dict[str, str]:
        return {"CHATBUS_NATS": urls[role]}

    nodes = []
    for i, model in enumerate(cfg.models):
        node_id = f"{new_node_id()}-{i}"
        argv = [py, "-m", "node", "--model", model, "--node-id", node_id, "--cache-dir", str(cfg.cache_dir)]
        argv.append("--serve-adapters")  # a finished train job of its base is served within seconds
        child = Child(
            f"node {model}", [*argv, *cfg.node_args], logs / f"node-{i}.log", bus("node"), node_id=node_id
        )
        nodes.append(child)
    fronts: list[Child] = []
    if cfg.gateway and importlib.util.find_spec("gateway.__main__"):
        argv = [py, "-m", "gateway", "--host", cfg.gateway_host, "--port", str(cfg.gateway_port)]
        env = {**bus("gateway"), **({"CHATBUS_API_KEYS": ",".join(cfg.api_keys)} if cfg.api_keys else {})}
        fronts.append(Child("gateway", argv, logs / "gateway.log", env))
    if cfg.web and importlib.util.find_spec("webui.__main__"):
        argv = [py, "-m", "webui", "--host", cfg.web_host, "--port", str(cfg.web_port)]
        fronts.append(Child("web UI", argv, logs / "webui.log", bus("ui")))
    for package, wanted in (("trainer", cfg.trainer), ("judge", cfg.judge)):
        if wanted and importlib.util.find_spec(f"{package}.__main__"):
            fronts.append(Child(package, [py, "-m", package], logs / f"{package}.log", bus("worker")))
    return nodes, fronts


def _role_urls(cfg: UpConfig, server: EmbeddedServer | None, url: str) -> dict[str, str]:
    """The URL each role connects with: its own credential on our embedded server; on a server of
    yours (`--nats`), the URL you gave, for everyone."""
    if server is None or not cfg.auth:
        return dict.fromkeys(ROLES, url)
    passwords = provision(cfg.state_dir).passwords
    return {role: with_credential(url, role, passwords[role]) for role in ROLES}


async def _wait_ready(url: str, nodes: list[Child], timeout: float) -> BusClient:
    """Wait until our nodes heartbeat on the bus; fail early if a node process exits."""
    client = await BusClient.connect(url, name="chatbus-up")
    deadline = time.monotonic() + timeout
    want = {child.node_id for child in nodes}
    while not want <= {n.node_id for n in client.nodes()}:
        for child in nodes:
            if not child.alive():
                await client.close()
                raise RuntimeError(f"{child.label} exited while starting:\n{child.tail()}")
        if time.monotonic() > deadline:
            await client.close()
            raise TimeoutError(f"nodes not ready after {timeout:.0f}s; see {nodes[0].log_path}")
        await asyncio.sleep(0.2)
    return client


async def _supervise(children: list[Child], stop: asyncio.Event) -> None:
    """Restart a child that died by itself, with a growing pause; give up after 5 tries."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
        for child in children:
            if child.stopping or child.alive() or child.restarts >= 5:
                continue
            child.restarts += 1
            code = child.process.returncode if child.process else "?"
            say(f"{child.label} exited ({code}); restarting (try {child.restarts}/5); log: {child.log_path}")
            await asyncio.sleep(min(10, 2**child.restarts))
            if not stop.is_set():
                child.start()


def _describe(client: BusClient, url: str, fronts: list[Child], cfg: UpConfig) -> None:
    for node in client.nodes():
        models = ", ".join(m.name for m in node.models)
        say(f"node {node.node_id}: {models} on {node.device} ({node.dtype})")
    say(f"bus      {redact(url)}")
    for child in fronts:
        if child.label == "gateway":
            say(f"gateway  http://{cfg.gateway_host}:{cfg.gateway_port}/v1  (OpenAI-compatible)")
        elif child.label == "web UI":
            say(f"web UI   http://{cfg.web_host}:{cfg.web_port}")
    say(
        f'ready. try: chatbus chat "What is the capital of France?"   (logs: {cfg.state_dir / "logs"}; Ctrl-C stops)'
    )


async def run_up(cfg: UpConfig) -> int:
    server: EmbeddedServer | None = None
    url = cfg.nats
    if url is None:
        config = provision(cfg.state_dir).config if cfg.auth else None
        if not cfg.auth and cfg.nats_host not in _LOOPBACK:
            say(
                f"error: --no-auth would open the bus to everyone who reaches {cfg.nats_host}; drop one of them"
            )
            return 2
        server = EmbeddedServer(
            cfg.state_dir / "jetstream",
            port=cfg.nats_port,
            host=cfg.nats_host,
            log_file=cfg.state_dir / "nats.log",
            config=config,
        )
        url = server.start()
        if cfg.nats_host not in _LOOPBACK:  # our own parts connect locally
            url = f"nats://127.0.0.1:{server.port}"
            say(
                f"the bus listens on {cfg.nats_host}:{server.port}: join with `chatbus node-token create` (docs/security.md)"
            )
    urls = _role_urls(cfg, server, url)
    if server is not None:
        await server.wait_jetstream(url=urls["admin"])
        nc = await connect(urls["admin"], name="chatbus-up-setup")
        try:
            await prepare_bus(nc)
        finally:
            await nc.close()
    # `chatbus chat`, the terminal app and `chatbus train|eval` find the bus (as a ui) here.
    write_nats_url(cfg.state_dir, urls["ui"])
    url = urls["ui"]
    nodes, fronts = _children(cfg, urls)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        say(
            f"starting {len(nodes)} node(s) on {redact(url)}; loading models (first start converts the default model, ~20 s)"
        )
        for child in nodes + fronts:
            child.start()
        client = await _wait_ready(url, nodes, cfg.ready_timeout)
        _describe(client, url, fronts, cfg)
        await client.close()
        await _supervise(nodes + fronts, stop)
        say("stopping")
        return 0
    except (RuntimeError, TimeoutError, BusUnavailable) as e:
        say(f"error: {e}")
        return 1
    finally:
        for child in fronts:
            child.stop(10)
        for child in nodes:
            child.stop(40)  # nodes drain their answers first
        if server is not None:
            server.stop()
        clear_nats_url(cfg.state_dir)
