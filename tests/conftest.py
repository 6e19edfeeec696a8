"""Shared fixtures: a real nats-server per test module, the real model's cache, process hygiene."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from bus import BusClient
from bus.server import EmbeddedServer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

# One conversion of the default GGUF shared by every test (and by subprocesses through --cache-dir).
MODEL_CACHE = Path(os.environ.get("CHATBUS_TEST_CACHE", Path.home() / ".cache" / "chatbus-test"))


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    data = tmp_path_factory.mktemp("nats")
    server = EmbeddedServer(data_dir=data / "js", port=0, log_file=data / "nats.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def nats_url(nats_server: EmbeddedServer) -> str:
    return nats_server.url


@pytest.fixture(scope="module")
async def client(nats_url: str) -> AsyncIterator[BusClient]:
    c = await BusClient.connect(nats_url, name="test-client")
    yield c
    await c.close()


@pytest.fixture(scope="session")
def model_cache() -> Path:
    MODEL_CACHE.mkdir(parents=True, exist_ok=True)
    return MODEL_CACHE
