"""GatewayConfig: everything the gateway app is built from (parsed in __main__, never read from env here)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GatewayConfig"]


@dataclass(frozen=True)
class GatewayConfig:
    api_keys: tuple[str, ...] = ()  # empty: no authentication
    cors_origins: tuple[str, ...] = ()  # empty: no CORS headers; ("*",) allows any origin
    max_body_bytes: int = 8 * 1024 * 1024  # larger HTTP bodies get 413
    max_n: int = 8  # the most choices one request may ask for
    deadline_s: float = 600.0  # wall-clock budget of one generation on its node
    sse_ping_s: float = 15.0  # SSE comment pings keep proxies from closing idle streams
    keepalive_s: float = 15.0  # a node stops generating this long after this gateway's keep-alives stop
