"""What every page shares: the bus client, the log and the rate limiter, built once per process."""

from __future__ import annotations

from dataclasses import dataclass

from bus import BusClient
from webui.config import WebConfig
from webui.limits import RateLimiter
from webui.logstore import LogStore

__all__ = ["Services"]


@dataclass
class Services:
    config: WebConfig
    client: BusClient
    logs: LogStore
    limiter: RateLimiter

    @classmethod
    async def start(cls, config: WebConfig, client: BusClient | None = None) -> Services:
        """Connect (or use `client`), make sure the log stream exists and follow the votes."""
        owns = client is None
        client = client or await BusClient.connect(config.nats, name="chatbus-webui")
        try:
            logs = LogStore(client)
            await logs.start()
        except BaseException:
            if owns:
                await client.close()
            raise
        services = cls(config, client, logs, RateLimiter(config.limits))
        services._owns_client = owns  # type: ignore[attr-defined]
        return services

    async def close(self) -> None:
        await self.logs.stop()
        if getattr(self, "_owns_client", False):
            await self.client.close()

    def model_names(self) -> list[str]:
        """Live chat models (embedding-only ones left out), sorted."""
        return sorted(self.client.models())
