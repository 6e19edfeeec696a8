"""Launch a NATS cluster (routes) or a hub + leafnode pair on loopback, from the same nats-server binary.

For tests and benchmarks (bench/chaos.py) on one machine; a real deployment writes the same
configuration (see docs/operations.md) by hand. Every server is its own process group, and `stop()`
stops exactly the servers this object started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from bus.server import find_binary, free_port, launch, stop_process_group, wait_for_jetstream

__all__ = ["LocalCluster", "ServerProcess", "leaf_config", "member_config"]


def member_config(
    name: str,
    *,
    host: str,
    port: int,
    store_dir: Path,
    cluster: str = "",
    cluster_port: int = 0,
    routes: list[int] | None = None,
    leaf_port: int = 0,
    domain: str = "",
) -> str:
    """A server's config file: JetStream on; with `cluster`, routes to the other members; with
    `leaf_port`, a leafnode listener that laptops connect to."""
    js_domain = f"  domain: {domain}\n" if domain else ""
    text = f'server_name: {name}\nlisten: "{host}:{port}"\n'
    text += f'jetstream {{\n  store_dir: "{store_dir}"\n{js_domain}}}\n'
    if cluster:
        seeds = ", ".join(f'"nats-route://{host}:{p}"' for p in routes or [])
        text += f'cluster {{\n  name: {cluster}\n  listen: "{host}:{cluster_port}"\n  routes: [{seeds}]\n}}\n'
    if leaf_port:
        text += f'leafnodes {{\n  listen: "{host}:{leaf_port}"\n}}\n'
    return text


def leaf_config(name: str, *, host: str, port: int, hubs: list[str], hub_domain: str) -> str:
    """A laptop's server: a leafnode connection to the hub (`nats-leaf://host:7422` URLs), no
    JetStream of its own, and its clients' JetStream API mapped into the hub's JetStream domain.

    Across a leafnode the server denies `$JS.API.>` and `$KV.>` between different domains (and
    between accounts that do not share the system account); the domain-prefixed API
    `$JS.<domain>.API.>` crosses, and the hub maps it back. So every chatbus part on the laptop
    uses the hub's streams and buckets, unchanged.
    """
    remotes = ", ".join(f'"{u}"' for u in hubs)
    return (
        f'server_name: {name}\nlisten: "{host}:{port}"\n'
        f"leafnodes {{\n  remotes: [{{ urls: [{remotes}] }}]\n}}\n"
        f"mappings: {{\n"
        f'  "$JS.API.>": "$JS.{hub_domain}.API.>"\n'
        f'  "$KV.>": "$JS.{hub_domain}.API.$KV.>"\n'
        f"}}\n"
    )


@dataclass
class ServerProcess:
    """One nats-server started from a config file; restartable with the same ports and store."""

    name: str
    config: Path
    port: int
    host: str = "127.0.0.1"
    log_file: Path | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 15.0) -> None:
        self.process = launch(
            [find_binary(), "-c", str(self.config)],
            self.log_file,
            self.host,
            self.port,
            timeout,
            f"nats-server {self.name}",
        )

    async def wait_jetstream(self, timeout: float = 30.0) -> None:
        """Until JetStream answers here (in a cluster: once the meta group has a leader; on a leaf:
        once the hub answers through it)."""
        await wait_for_jetstream(self.url, timeout)

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.process = self.process, None
        if proc is not None:
            stop_process_group(proc, timeout)

    def kill(self) -> None:
        """SIGKILL: a crash, no goodbye to the cluster."""
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@dataclass
class LocalCluster:
    """`size` JetStream servers routed into one cluster on `host`, each with its own store dir.

    `with_leafnodes` gives every member a leafnode listener (`leaf_urls`) for laptops to connect to.
    """

    root: Path
    size: int = 3
    name: str = "chatbus"
    host: str = "127.0.0.1"
    with_leafnodes: bool = False
    domain: str = ""
    servers: list[ServerProcess] = field(default_factory=list, init=False)
    leaves: list[ServerProcess] = field(default_factory=list, init=False)
    leaf_ports: list[int] = field(default_factory=list, init=False)

    @property
    def urls(self) -> str:
        """Every member's client URL, comma-separated: what `--nats` takes."""
        return ",".join(s.url for s in self.servers)

    @property
    def leaf_urls(self) -> list[str]:
        return [f"nats-leaf://{self.host}:{p}" for p in self.leaf_ports]

    def start(self) -> LocalCluster:
        ports = self._free_ports(self.size)
        cluster_ports = self._free_ports(self.size, avoid=ports)
        self.leaf_ports = (
            self._free_ports(self.size, avoid=ports + cluster_ports) if self.with_leafnodes else []
        )
        self.root.mkdir(parents=True, exist_ok=True)
        for i in range(self.size):
            name = f"{self.name}-{i + 1}"
            config = self.root / f"{name}.conf"
            text = member_config(
                name,
                host=self.host,
                port=ports[i],
                store_dir=self.root / name,
                cluster=self.name if self.size > 1 else "",
                cluster_port=cluster_ports[i],
                routes=[p for j, p in enumerate(cluster_ports) if j != i],
                leaf_port=self.leaf_ports[i] if self.with_leafnodes else 0,
                domain=self.domain,
            )
            config.write_text(text)
            self.servers.append(ServerProcess(name, config, ports[i], self.host, self.root / f"{name}.log"))
        try:
            for server in self.servers:
                server.start()
        except BaseException:
            self.stop()
            raise
        return self

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Until every running member answers a JetStream request (the meta group has a leader)."""
        for server in self.servers:
            if server.running:
                await server.wait_jetstream(timeout)

    def add_leaf(self, name: str = "laptop") -> ServerProcess:
        """Start a laptop-style server that joins this cluster through a leafnode connection
        (needs `with_leafnodes` and a `domain`); `stop()` stops it too."""
        if not (self.leaf_ports and self.domain):
            raise ValueError("a leaf needs a cluster started with_leafnodes=True and a JetStream domain")
        port = self._free_ports(1, avoid=[s.port for s in self.servers] + self.leaf_ports)[0]
        config = self.root / f"{name}.conf"
        config.write_text(
            leaf_config(name, host=self.host, port=port, hubs=self.leaf_urls, hub_domain=self.domain)
        )
        leaf = ServerProcess(name, config, port, self.host, self.root / f"{name}.log")
        self.leaves.append(leaf)
        leaf.start()
        return leaf

    def stop(self) -> None:
        for server in [*self.leaves, *self.servers]:
            server.stop()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _free_ports(self, n: int, avoid: list[int] | None = None) -> list[int]:
        ports: list[int] = []
        while len(ports) < n:
            port = free_port(0, self.host)
            if port not in ports and port not in (avoid or []):
                ports.append(port)
        return ports
