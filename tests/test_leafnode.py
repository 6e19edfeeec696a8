"""A node on a laptop joins a secured hub through a leafnode with its own node credential: it answers
a request through the hub's gateway, and the hub holds the leaf connection to that credential's rights.

Real nats-server processes: a hub (JetStream domain `hub`, the role users of bus.auth.provision, a
leafnode listener) and a laptop server made by `leaf_config` in `tests/cluster.py`, whose remote logs in with a
credential from `chatbus node-token create --leaf` (bus.auth.leaf_node_permissions).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import nats
import openai
import pytest
from cluster import ServerProcess, leaf_config, member_config
from fakes import EchoEngine, echo_node
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import KeyNotFoundError
from procs import eventually
from test_gateway_support import LoopThread, gateway

from bus import subjects
from bus.auth import Issued, provision, save_issued, with_credential
from bus.connection import connect
from bus.server import free_port, wait_for_jetstream
from chatbus.cli import cmd_setup_bus

MODEL = "echo-laptop"
NODE = "laptop"  # the credential's name is the node's id


class Bus:
    def __init__(self, root: Path) -> None:
        self.root = root
        save_issued(root / "state", {NODE: Issued(NODE, "node", "pw-laptop", models=[MODEL], leaf=True)})
        self.prov = provision(root / "state")
        users = json.loads(self.prov.config.read_text())["authorization"]
        hub_port, self.leaf_port, laptop_port = free_port(), free_port(), free_port()
        text = member_config(
            "hub",
            host="127.0.0.1",
            port=hub_port,
            store_dir=root / "hub",
            leaf_port=self.leaf_port,
            domain="hub",
        )
        (root / "hub.conf").write_text(text + f"authorization: {json.dumps(users)}\n")
        self.hub = ServerProcess("hub", root / "hub.conf", hub_port, log_file=root / "hub.log")
        remote = f"nats-leaf://node-{NODE}:pw-laptop@127.0.0.1:{self.leaf_port}"
        config = leaf_config("laptop", host="127.0.0.1", port=laptop_port, hubs=[remote], hub_domain="hub")
        (root / "laptop.conf").write_text(config)
        self.laptop = ServerProcess("laptop", root / "laptop.conf", laptop_port, log_file=root / "laptop.log")

    def url(self, role: str) -> str:
        return with_credential(self.hub.url, role, self.prov.passwords[role])

    @property
    def laptop_url(self) -> str:
        """The laptop's own server, no password (it has none); the user names the node's inbox."""
        return with_credential(self.laptop.url, f"node-{NODE}", "-")


@pytest.fixture(scope="module")
def bus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bus]:
    b = Bus(tmp_path_factory.mktemp("leafnode"))
    b.hub.start()
    try:
        b.laptop.start()
        yield b
    finally:
        b.laptop.stop()
        b.hub.stop()


@pytest.fixture(scope="module")
def node(bus: Bus, thread: LoopThread) -> Iterator[None]:
    """The laptop's node, in `thread`'s loop (the gateway test below blocks on the sync SDK)."""
    thread.call(wait_for_jetstream(bus.url("admin"), 20))
    assert thread.call(cmd_setup_bus(bus.url("admin"))) == 0
    thread.call(_leaf_connected(bus.laptop_url))
    running = echo_node(bus.laptop_url, EchoEngine(MODEL), node_id=NODE)
    thread.call(running.__aenter__())
    try:
        yield
    finally:
        thread.call(running.__aexit__(None, None, None))


async def _leaf_connected(url: str, timeout: float = 20) -> None:
    """Until the hub's JetStream answers through the leafnode, as the node will ask it."""
    nc = await connect(url, name="laptop-probe")
    try:
        for _ in range(int(timeout / 0.2)):
            try:
                await nc.jetstream().stream_info(f"KV_{subjects.NODES_BUCKET}")
                return
            except Exception:
                await asyncio.sleep(0.2)
        raise AssertionError("the laptop never reached the hub's JetStream")
    finally:
        await nc.close()


@pytest.fixture(scope="module")
def thread() -> Iterator[LoopThread]:
    t = LoopThread()
    yield t
    t.stop()


def test_a_node_behind_a_leafnode_answers_through_the_hubs_gateway(
    bus: Bus, node: None, thread: LoopThread
) -> None:
    with gateway(thread, bus.url("gateway")) as gw:
        thread.call(eventually(lambda: MODEL in gw.client.table.models(), 15))
        sdk = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="none", max_retries=0, timeout=30)
        r = sdk.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hello from the hub"}]
        )
        assert r.choices[0].message.content == "hello from the hub"
        chunks = sdk.completions.create(model=MODEL, prompt="and streamed back", stream=True)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == "and streamed back"
        assert {n.node_id for n in gw.client.table.nodes() if any(m.name == MODEL for m in n.models)} == {
            NODE
        }


async def _heard(hub: nats.NATS, subject: str, send: nats.NATS, send_subject: str = "") -> bool:
    """Whether a message sent from `send` on `send_subject` (default `subject`) reaches `hub`."""
    got: list[bytes] = []

    async def take(msg: nats.aio.msg.Msg) -> None:
        got.append(msg.data)

    sub = await hub.subscribe(subject, cb=take)
    await hub.flush()
    await asyncio.sleep(0.3)  # the interest crosses the leafnode connection
    await send.publish(send_subject or subject, b"probe")
    await send.flush()
    await asyncio.sleep(0.5)
    await sub.unsubscribe()
    return bool(got)


async def test_the_leaf_connection_has_the_node_credentials_rights_only(bus: Bus, node: None) -> None:
    admin = await connect(bus.url("admin"), name="hub-admin")
    laptop = await connect(
        bus.laptop.url, name="laptop-anything"
    )  # anything on the laptop crosses as the node
    try:
        assert await _heard(admin, "cb.tok.gateway.x", laptop)  # what a node may send, arrives
        for forbidden in [
            "cb.log.chat",  # write the chat log
            "cb.gen.someone-else",  # ask other nodes
            "cb.job.train.x",  # submit a job
            f"{subjects.inbox_prefix('admin')}.x",  # answer into an operator's inbox
            "cb.prompt.gateway.x.0",  # swap a prompt sent by reference
        ]:
            assert not await _heard(admin, forbidden, laptop), f"the laptop could publish {forbidden}"
        # Heartbeats: its own key is stored, one under another node's id or model is refused.
        kv = await admin.jetstream().key_value(subjects.NODES_BUCKET)
        assert await kv.get(subjects.node_key(NODE, MODEL))
        for node_id, model in (("other", MODEL), (NODE, "other-model")):
            await laptop.publish(f"$KV.{subjects.NODES_BUCKET}.{subjects.node_key(node_id, model)}", b"{}")
            await laptop.flush()
            await asyncio.sleep(0.5)
            with pytest.raises(KeyNotFoundError):
                await kv.get(subjects.node_key(node_id, model))
        # What the hub forwards to the laptop: its control subject, not the chat log, a gateway's
        # replies, or requests for a model its credential does not allow.
        assert await _heard(laptop, subjects.ctl(NODE), admin)
        for hidden in ["cb.log.chat", f"{subjects.inbox_prefix('gateway')}.x", subjects.ctl("other")]:
            assert not await _heard(laptop, hidden, admin), f"the laptop could read {hidden}"
        await laptop.subscribe(subjects.gen("other-model"))
        await laptop.flush()
        await asyncio.sleep(0.3)
        with pytest.raises((NoRespondersError, NatsTimeout)):
            await admin.request(subjects.gen("other-model"), b"{}", timeout=1)
    finally:
        await laptop.close()
        await admin.close()
