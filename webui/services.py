"""What every page shares: the bus client, the log, the rate limiter, the job records, node history, usage."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from bus import BusClient, Jobs
from webui.config import WebConfig
from webui.jobdata import JobsMirror
from webui.limits import RateLimiter
from webui.logstore import LogStore
from webui.nodehistory import NodeHistory
from webui.usage import UsageReader

__all__ = ["Services"]

log = logging.getLogger(__name__)


@dataclass
class Services:
    config: WebConfig
    client: BusClient
    logs: LogStore
    limiter: RateLimiter
    history: NodeHistory = None  # type: ignore[assignment]  # made in __post_init__ when not given
    usage: UsageReader = None  # type: ignore[assignment]
    jobs: Jobs | None = None  # None when the bus refused the job records (jobs_error says why)
    job_records: JobsMirror | None = None
    jobs_error: str = ""

    def __post_init__(self) -> None:
        if self.history is None:
            self.history = NodeHistory(self.client.nodes)
        if self.usage is None:
            self.usage = UsageReader(self.client, self.config.usage_nats or None)

    @classmethod
    async def start(cls, config: WebConfig, client: BusClient | None = None) -> Services:
        """Connect (or use `client`), make sure the log stream exists and follow the votes and jobs."""
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
        services.history.start()
        services._owns_client = owns  # type: ignore[attr-defined]
        await services._start_jobs()
        return services

    async def _start_jobs(self) -> None:
        """The job records, followed live; the app still serves chat when the bus refuses them."""
        try:
            self.jobs = await self.client.jobs()
            mirror = JobsMirror(self.jobs.records, self.client.reconnects)
            await mirror.start()
            self.job_records = mirror
        except Exception as e:
            self.jobs_error = f"{type(e).__name__}: {e}"
            log.warning("web UI: no job records (%s); the Jobs page says so", self.jobs_error)

    async def close(self) -> None:
        if self.job_records is not None:
            await self.job_records.stop()
        await self.history.stop()
        await self.usage.close()
        await self.logs.stop()
        if getattr(self, "_owns_client", False):
            await self.client.close()

    def model_names(self) -> list[str]:
        """Live chat models (embedding-only ones left out), sorted."""
        return sorted(self.client.models())
