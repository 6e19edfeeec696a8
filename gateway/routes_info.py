"""GET /v1/models, /health; POST /v1/embeddings and the token-count endpoint."""

from __future__ import annotations

import asyncio
import base64
import struct
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from bus import BusClient, ModelEntry, ModelNotFound
from bus.schemas import EmbedRequest
from gateway.config import GatewayConfig
from gateway.errors import ApiError
from gateway.http import check_bus, check_payload, json_response, read_body
from gateway.schemas import EmbeddingRequest, TokenCheckRequest, chat_messages, embedding_inputs, parse

__all__ = ["embeddings", "health", "list_models", "model_detail", "token_check"]


def _state(request: Request) -> tuple[BusClient, GatewayConfig]:
    return request.app.state.client, request.app.state.config


def _model_json(entry: ModelEntry) -> dict[str, Any]:
    started = [n.started_at for n in entry.nodes if n.started_at]
    return {
        "id": entry.name,
        "object": "model",
        "created": int(min(started)) if started else 0,
        "owned_by": "chatbus",
        "parent": entry.base or None,  # a LoRA adapter's base model, as vLLM lists its adapters
        "context_length": entry.context_length,
        "can_embed": entry.can_embed,
        "nodes": [
            {
                "node_id": n.node_id,
                "host": n.host,
                "device": n.device,
                "dtype": n.dtype,
                "capacity": n.capacity,
                "running": n.running,
                "queued": n.queued,
                "tokens_per_s": n.tokens_per_s,
            }
            for n in entry.nodes
        ],
    }


def _entry(client: BusClient, model: str) -> ModelEntry:
    models = client.models()
    if model not in models:
        raise ModelNotFound(model, list(models))
    return models[model]


async def list_models(request: Request) -> Response:
    client, _ = _state(request)
    models = client.models()
    return json_response({"object": "list", "data": [_model_json(models[k]) for k in sorted(models)]})


async def model_detail(request: Request) -> Response:
    client, _ = _state(request)
    return json_response(_model_json(_entry(client, request.path_params["model_id"])))


async def health(request: Request) -> Response:
    client, _ = _state(request)
    connected = client.nc.is_connected
    nodes = client.nodes() if connected else []
    body = {
        "status": "ok" if connected and nodes else ("no_nodes" if connected else "bus_unavailable"),
        "bus": {"connected": connected},
        "nodes": len(nodes),
        "models": sorted(client.models()) if connected else [],
    }
    return json_response(body, 200 if connected else 503)


def _float32_base64(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


async def embeddings(request: Request) -> Response:
    client, config = _state(request)
    req = parse(await read_body(request, config.max_body_bytes), EmbeddingRequest)
    inputs = embedding_inputs(req)
    check_bus(client)
    if not _entry(client, req.model).can_embed:
        raise ApiError(
            400,
            f"model {req.model!r} cannot embed on any of its nodes; use a model whose "
            f"/v1/models entry has can_embed: true",
            code="model_cannot_embed",
            param="model",
        )
    check_payload(client, EmbedRequest(model=req.model, inputs=inputs), "input")
    reply = await client.embed(req.model, inputs)
    encode = _float32_base64 if req.encoding_format == "base64" else list
    data = [
        {"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(reply.embeddings)
    ]
    usage = {"prompt_tokens": reply.prompt_tokens, "total_tokens": reply.prompt_tokens}
    return json_response({"object": "list", "data": data, "model": req.model, "usage": usage})


async def token_check(request: Request) -> Response:
    """FastChat's /api/v1/token_check: does each prompt (+ max_tokens) fit its model's context?"""
    client, config = _state(request)
    req = parse(await read_body(request, config.max_body_bytes), TokenCheckRequest)
    check_bus(client)

    async def one(i: int) -> dict[str, Any]:
        item = req.prompts[i]
        if (item.prompt is None) == (item.messages is None):
            raise ApiError(400, "each item needs exactly one of prompt or messages", param=f"prompts[{i}]")
        _entry(client, item.model)
        messages = chat_messages(item.messages, f"prompts[{i}].messages") if item.messages else None
        reply = await client.count_tokens(item.model, messages=messages, prompt=item.prompt)
        fits = reply.tokens + max(0, item.max_tokens) <= reply.context_length
        return {"fits": fits, "tokenCount": reply.tokens, "contextLength": reply.context_length}

    results = await asyncio.gather(*(one(i) for i in range(len(req.prompts))))
    return json_response({"prompts": list(results)})
