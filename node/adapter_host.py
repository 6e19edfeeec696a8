"""The bus side of a node's LoRA adapters: answers load/unload/list, and serves new train results.

Knows NATS, not torch: the weights are the engine's (`engine.adapters`, node/lora.py); this module
fetches what a command names (a train job's result or a stored artifact through the Object Store, or
a PEFT dir on this machine), asks the engine to load it, and has the NodeService take requests and
heartbeat under its name. With `serve_new`, it watches the job records and loads every train job of
this node's base that finishes after the node started (`--serve-adapters`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js.kv import KeyValue

from bus import subjects
from bus.artifacts import INFO_FILE, NEEDS_ADAPTERS, describe, fetch_on
from bus.codec import decode
from bus.errors import BadMessage, BadRequest, BusError, Code
from bus.schemas import ModelCard
from bus.schemas_adapters import AdapterCommand, AdapterReply, AdapterState
from bus.schemas_jobs import ArtifactInfo, JobRecord
from node.service import NodeService

__all__ = ["AdapterHost"]

log = logging.getLogger(__name__)


class Unsupported(BusError):
    code = Code.UNSUPPORTED


class AdapterHost:
    def __init__(
        self,
        service: NodeService,
        *,
        cache_dir: Path,
        serve_new: bool = False,
        may_serve: list[str] | None = None,
    ) -> None:
        self.service = service
        self.cache_dir = Path(cache_dir)
        self.serve_new = serve_new
        self.may_serve = may_serve  # a node credential's models (None: any)
        self.adapters: Any = getattr(service.engine, "adapters", None)  # node.lora.AdapterSet
        self._lock = asyncio.Lock()  # one command at a time
        self._sub: Any = None
        self._watch: asyncio.Task[None] | None = None
        self.started = time.time()

    async def start(self) -> None:
        nc = self.service.nc
        self._sub = await nc.subscribe(subjects.adapters(self.service.node_id), cb=self._on_command)
        if self.serve_new and self.adapters is not None:
            self._watch = asyncio.create_task(self._watch_jobs(), name="node-serve-adapters")

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    # ------------------------------------------------------------------ commands

    async def _on_command(self, msg: Msg) -> None:
        await self.service._answer(msg, AdapterCommand, self.command)

    async def command(self, cmd: AdapterCommand) -> AdapterReply:
        if self.adapters is None:
            raise Unsupported(
                f"node {self.service.node_id} runs an engine without adapters (llama.cpp): "
                "start it with --engine hf to serve LoRA adapters"
            )
        async with self._lock:
            if cmd.action == "load":
                card = await self.load(cmd.ref, cmd.name)
                return self.reply(f"serving {card.name} on base {card.base}")
            if cmd.action == "unload":
                subjects.check_name(cmd.name, "name")
                running = await asyncio.to_thread(self.adapters.unload, cmd.name)
                await self.sync()
                tail = f"; {running} running answer(s) finish first" if running else ""
                return self.reply(f"unloaded {cmd.name}{tail}")
            return self.reply("")

    def reply(self, message: str) -> AdapterReply:
        states = [AdapterState(**d) for d in self.adapters.describe()] if self.adapters is not None else []
        return AdapterReply(
            node_id=self.service.node_id,
            base=self.service.model,
            message=message,
            adapters=states,
            max_adapters=self.adapters.max_adapters if self.adapters is not None else 0,
        )

    async def load(self, ref: str, name: str = "") -> ModelCard:
        """Fetch (unless a local dir), load into the engine, and serve under its name."""
        if not ref:
            raise BadRequest("load needs a train job id, a `models/<digest>` artifact or a PEFT dir")
        local = await asyncio.to_thread(_local_dir, ref)
        folder = local or await fetch_on(self.service.nc, ref, self.cache_dir)
        info = await asyncio.to_thread(_info, folder)
        if info is not None and info.method == "full":
            raise BadRequest(
                f"{ref} holds full weights, not a LoRA: serve it with `chatbus node --adapter {ref}`"
            )
        name = name or (info.name if info is not None else "") or folder.name
        subjects.check_name(name, "name")
        if name == self.service.model or name in self.service.aliases:
            raise BadRequest(f"{name!r} is this node's base model: give the adapter another --name")
        if self.may_serve is not None and name not in self.may_serve:
            raise BadRequest(
                f"this node's credential may serve {', '.join(self.may_serve)}, not {name!r}: pass --name, "
                "or ask the operator for a credential with that model"
            )
        card: ModelCard = await asyncio.to_thread(self.adapters.load, folder, name, ref)
        await self.sync()
        log.info("serving adapter %s (%s) on base %s", card.name, ref, card.base)
        return card

    async def sync(self) -> None:
        """Serve exactly what the engine holds (a load may have evicted the least recently used)."""
        cards = {c.name: c for c in self.adapters.cards()}
        for name in self.service.served:
            if name not in cards:
                await self.service.withdraw_model(name)
        for card in cards.values():
            await self.service.serve_model(card)

    # ------------------------------------------------------------------ --serve-adapters

    async def _watch_jobs(self) -> None:
        """Load each train job of our base that finishes from now on (restarting the watch on errors).
        No jobs bucket yet is normal on a new bus; a credential that may not read it is said once."""
        warned = False
        while True:
            try:
                kv = await self.service.js.key_value(subjects.JOBS_BUCKET)
                watcher = await kv.watchall()
                while True:
                    try:
                        entry = await watcher.updates(timeout=5.0)
                    except NatsTimeout:
                        continue
                    if isinstance(entry, KeyValue.Entry) and entry.value:
                        await self._on_record(entry.value)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if isinstance(e, NatsTimeout) and not warned:
                    log.warning("--serve-adapters cannot watch the train jobs: %s", NEEDS_ADAPTERS)
                    warned = True
                log.debug("job watch restarting after %r", e)
                await asyncio.sleep(2.0)

    async def _on_record(self, raw: bytes) -> None:
        try:
            record = decode(raw, JobRecord)
        except BadMessage:
            return
        result = record.result if isinstance(record.result, dict) else {}
        if record.kind != "train" or record.state != "done" or record.updated_at < self.started - 1:
            return
        name, base = str(result.get("name") or ""), str(result.get("base") or "")
        if result.get("method") == "full" or not name or name in self.service.served:
            return
        if not self.adapters.fits(base):
            log.info(
                "train job %s is for %s, not our base %s: not serving it",
                record.job_id,
                base,
                self.adapters.base,
            )
            return
        async with self._lock:
            try:
                await self.load(record.job_id)
            except BusError as e:
                log.warning("could not serve train job %s: %s", record.job_id, e.message)


def _local_dir(ref: str) -> Path | None:
    """`ref` as a PEFT dir on this machine, if it is one."""
    path = Path(ref).expanduser()
    return path.resolve() if path.is_dir() else None


def _info(folder: Path) -> ArtifactInfo | None:
    return describe(folder) if (folder / INFO_FILE).is_file() else None
