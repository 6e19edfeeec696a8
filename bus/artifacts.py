"""Fetch a trained adapter (or full model) from the Object Store into a local dir a node can load.

Lives in bus/ because both sides use it: the trainer's CLI and `python -m node --adapter`.
"""

from __future__ import annotations

import asyncio
import io
import tarfile
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import BucketNotFoundError

from bus.auth import redact
from bus.codec import decode, encode
from bus.connection import connect
from bus.errors import BadRequest
from bus.jobs import Jobs
from bus.schemas_jobs import ArtifactInfo

__all__ = [
    "INFO_FILE",
    "NEEDS_ADAPTERS",
    "ArtifactInfo",
    "describe",
    "fetch_adapter",
    "fetch_on",
    "fetch_with",
    "resolve_artifact",
    "write_info",
]

INFO_FILE = "chatbus.json"  # in every stored model dir: its ArtifactInfo
NEEDS_ADAPTERS = (
    "this credential may not read the trained models: a node needs one made with "
    "`chatbus node-token create ... --adapters`"
)


async def resolve_artifact(jobs: Jobs, ref: str) -> str:
    """An Object Store name from a train job id or an artifact name (`models/<digest>`)."""
    if await jobs.has_artifact(ref):
        return ref
    record = await jobs.get(ref)
    if record is None or record.kind != "train":
        raise BadRequest(
            f"{ref!r} is neither a train job nor a stored model: `chatbus train list` shows the jobs"
        )
    if record.state != "done":
        raise BadRequest(
            f"train job {ref} is {record.state}, not done: nothing to serve yet ({record.message})"
        )
    result: Any = record.result
    if not isinstance(result, dict) or not result.get("artifact"):
        raise BadRequest(f"train job {ref} finished without storing a model")
    return str(result["artifact"])


async def fetch_with(jobs: Jobs, ref: str, dest: Path) -> Path:
    """Download and unpack into `dest/<digest>` (skipped when already there); returns that dir."""
    name = await resolve_artifact(jobs, ref)
    target = Path(dest) / name.replace("/", "-")
    if (target / INFO_FILE).is_file():
        return target
    data = await jobs.get_artifact(name)

    def unpack() -> None:
        partial = target.with_name(target.name + ".partial")
        partial.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            tar.extractall(partial, filter="data")  # refuses absolute paths and links out of the dir
        partial.rename(target)

    await asyncio.to_thread(unpack)
    return target


async def fetch_adapter(nats_url: str, ref: str, dest: Path) -> Path:
    """`ref` is a train job id or an artifact name. The dir holds `chatbus.json` (an ArtifactInfo),
    the tokenizer, and either a peft adapter (`adapter_config.json`) or full model weights."""
    nc = await connect(nats_url, name="chatbus-fetch")
    try:
        return await fetch_on(nc, ref, dest, redact(nats_url))
    finally:
        await nc.close()


async def fetch_on(nc: NATS, ref: str, dest: Path, bus: str = "this bus") -> Path:
    """`fetch_with` over an open connection, saying plainly the two ways a node's fetch fails: nothing
    trained on `bus` yet, or a credential that may not read the trained models."""
    try:
        jobs = await Jobs(nc).attach()  # a node may read the artifacts, not create streams
        return await fetch_with(jobs, ref, dest)
    except BucketNotFoundError:
        raise BadRequest(f"no trained models on {bus} yet: nothing to fetch as {ref!r}") from None
    except NatsTimeout as e:  # the server refuses what a credential may not do: we hear nothing
        raise BadRequest(NEEDS_ADAPTERS) from e


def describe(path: Path) -> ArtifactInfo:
    """The `chatbus.json` a model dir carries (name to serve it under, base, method, job id)."""
    return decode((Path(path) / INFO_FILE).read_bytes(), ArtifactInfo)


def write_info(path: Path, info: ArtifactInfo) -> None:
    """Write `chatbus.json` into a model dir (the trainer, before it stores the dir)."""
    (Path(path) / INFO_FILE).write_bytes(encode(info))
