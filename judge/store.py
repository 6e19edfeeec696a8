"""A JSONL file of records kept in the Object Store and rewritten as records arrive (the resume point)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from bus import BadRequest, Jobs

__all__ = ["RecordStore", "answers_name", "judgments_name", "parse_jsonl", "to_jsonl"]

Record = dict[str, Any]


def answers_name(job_id: str) -> str:
    return f"eval/{job_id}/answers.jsonl"


def judgments_name(job_id: str) -> str:
    return f"eval/{job_id}/judgments.jsonl"


def parse_jsonl(data: bytes | str) -> list[Record]:
    text = data.decode() if isinstance(data, bytes) else data
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def to_jsonl(records: list[Record]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()


class RecordStore:
    """Records by key, written through as they arrive (coalesced), so a killed worker loses little."""

    def __init__(self, jobs: Jobs, name: str, key: Callable[[Record], tuple[Any, ...]]) -> None:
        self.jobs = jobs
        self.name = name
        self.key = key
        self.records: dict[tuple[Any, ...], Record] = {}
        self._lock = asyncio.Lock()
        self._version = 0
        self._written = 0
        self._write_s = 0.0  # how long the last write took
        self._last_end = 0.0

    async def load(self) -> int:
        """Read what an earlier attempt stored; returns how many records there were."""
        if not await self.jobs.has_artifact(self.name):
            return 0
        try:
            data = await self.jobs.get_artifact(self.name)
        except BadRequest:
            return 0
        for record in parse_jsonl(data):
            self.records[self.key(record)] = record
        return len(self.records)

    def get(self, key: tuple[Any, ...]) -> Record | None:
        return self.records.get(key)

    async def add(self, record: Record) -> None:
        """Keep `record`; write the file now unless that would spend over ~20% of the time writing
        (a big file is rewritten at most every 4x its write time; `flush()` at the end of a phase)."""
        self.records[self.key(record)] = record
        self._version += 1
        if time.monotonic() - self._last_end >= 4 * self._write_s:
            await self.flush()

    async def flush(self) -> None:
        async with self._lock:
            if self._written == self._version:
                return  # someone else's write already carried this record
            version = self._version
            start = time.monotonic()
            await self.jobs.put_named(self.name, to_jsonl(list(self.records.values())))
            self._last_end = time.monotonic()
            self._write_s = self._last_end - start
            self._written = version
