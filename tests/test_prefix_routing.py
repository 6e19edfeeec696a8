"""Cache-aware routing: a conversation's next turn goes to the node that holds its history, unless busy.

Scripted engines (tests/fakes.py) that advertise what they answered, on a real nats-server, seen
through a real BusClient.
"""

from __future__ import annotations

from fakes import EchoEngine, echo_node
from procs import eventually

from bus import BusClient, ChatMessage, SamplingParams
from bus.nodes import CACHE_SLACK
from bus.prefixes import prefix_hashes
from bus.schemas import GenerateRequest
from node.engine import EngineRequest

MODEL = "echo-cache"


def holder_of(client: BusClient, messages: list[ChatMessage]) -> set[str]:
    key = prefix_hashes(messages)[-1]
    return {n.node_id for n in client.nodes() if key in n.cached_prefixes}


async def turn(client: BusClient, messages: list[ChatMessage]) -> tuple[str, str]:
    stream = client.chat(MODEL, messages, SamplingParams(max_tokens=8))
    async for _ in stream:
        pass
    return stream.node_id, stream.text


async def test_next_turns_follow_the_history(nats_url: str, client: BusClient) -> None:
    async with (
        echo_node(nats_url, EchoEngine(MODEL), "cache-a"),
        echo_node(nats_url, EchoEngine(MODEL), "cache-b"),
    ):
        await eventually(lambda: MODEL in client.models() and len(client.models()[MODEL].nodes) == 2)
        follows = 0
        for i in range(8):
            history = [ChatMessage(role="user", content=f"conversation {i} starts here")]
            node, reply = await turn(client, history)
            history.append(ChatMessage(role="assistant", content=reply))
            await eventually(lambda h=history: holder_of(client, h))  # type: ignore[misc]
            assert holder_of(client, history) == {node}
            history.append(ChatMessage(role="user", content="and then?"))
            again, _ = await turn(client, history)
            follows += again == node
        assert follows == 8  # by chance (power of two on equal loads): 1 in 256


async def test_much_busier_holder_is_passed_over(nats_url: str, client: BusClient) -> None:
    name = MODEL + "-busy"
    holder, other = EchoEngine(name, step_s=0.5, max_running=2), EchoEngine(name, max_running=2)
    async with echo_node(nats_url, holder, "busy-a"), echo_node(nats_url, other, "busy-b"):
        await eventually(lambda: name in client.models() and len(client.models()[name].nodes) == 2)
        history = [ChatMessage(role="user", content="hello there")]
        holder.held.extend(prefix_hashes(history))
        await eventually(lambda: holder_of(client, history) == {"busy-a"})
        route = lambda: client.table.candidates(name, set(), prefix_hashes(history))[0].node_id  # noqa: E731
        assert route() == "busy-a"
        # Load the holder past the slack (requests straight into its engine: the bus only sees the load).
        hogs = int(holder.max_running * (1 + CACHE_SLACK)) + 1
        for i in range(hogs):
            request = EngineRequest(request_id=f"hog{i}", prompt=" ".join(["w"] * 50))
            holder.submit(request, lambda d: None)
        await eventually(lambda: any(n.node_id == "busy-a" and n.running >= hogs for n in client.nodes()))
        assert route() == "busy-b"
        for i in range(hogs):
            holder.cancel(f"hog{i}")
        await eventually(lambda: any(n.node_id == "busy-a" and n.running == 0 for n in client.nodes()), 15)
        assert route() == "busy-a"


async def test_the_flag_turns_it_off(nats_url: str, client: BusClient) -> None:
    request = GenerateRequest(request_id="r", model=MODEL, messages=[ChatMessage(role="user", content="hi")])
    assert client.prefixes_for(request) == prefix_hashes(request.messages or [])
    plain = await BusClient.connect(nats_url, name="plain", cache_aware=False)
    try:
        assert plain.prefixes_for(request) == []
    finally:
        await plain.close()
