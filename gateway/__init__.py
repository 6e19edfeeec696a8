"""chatbus gateway: an OpenAI-compatible HTTP API (Starlette + sse-starlette + uvicorn) over the bus."""

from gateway.app import build_app
from gateway.config import GatewayConfig

__all__ = ["GatewayConfig", "build_app"]
