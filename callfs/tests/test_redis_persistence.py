"""Redis metadata survives a Redis restart when Redis persists (appendonly yes, appendfsync
always): an entry written through ``RedisMetadataStore`` is there after the server stops and
starts again on the same port and data directory. Uses a private redis-server, never the
machine's shared one."""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from callfs.metadata.redis import RedisMetadataStore
from callfs.model import BackendType, Entry, EntryType
from callfs.tests.services import PrivateRedis, private_redis


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[PrivateRedis]:
    with private_redis(tmp_path, appendonly=True) as server:
        yield server


def directory(path: str) -> Entry:
    return Entry(
        path=path,
        type=EntryType.DIRECTORY,
        size=0,
        owner="u",
        mtime=1,
        backend_type=BackendType.LOCALFS,
        instance_id=None,
    )


async def write_entry(addr: str, entry: Entry) -> None:
    store = RedisMetadataStore(addr, key_prefix="callfs-persist:", op_timeout=5.0)
    await store.start()
    try:
        await store.create(entry)
        got = await store.get(entry.path)
        assert got is not None and got.path == entry.path
    finally:
        await store.close()


async def read_entry(addr: str, path: str) -> Entry | None:
    store = RedisMetadataStore(addr, key_prefix="callfs-persist:", op_timeout=5.0)
    await store.start()
    try:
        return await store.get(path)
    finally:
        await store.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["clean-shutdown", "crash"])
async def test_entry_survives_redis_restart(redis_server: PrivateRedis, sig: int) -> None:
    entry = directory("/persisted")
    await write_entry(redis_server.addr, entry)
    port, data_dir = redis_server.port, redis_server.data_dir
    redis_server.stop(sig)  # SIGTERM: Redis's clean shutdown; SIGKILL: no chance to flush
    redis_server.start()  # same port, same dir: the AOF is replayed
    assert (redis_server.port, redis_server.data_dir) == (port, data_dir)
    got = await read_entry(redis_server.addr, entry.path)
    assert got is not None, redis_server.logs()
    assert (got.path, got.type, got.size, got.owner, got.mtime, got.backend_type) == (
        "/persisted",
        EntryType.DIRECTORY,
        0,
        "u",
        1,
        BackendType.LOCALFS,
    )
    assert got.instance_id is None
    assert got.version == 1
    root = await read_entry(redis_server.addr, "/")
    assert root is not None and root.type == EntryType.DIRECTORY


@pytest.mark.parametrize("appendonly", [True, False], ids=["always", "no-aof"])
async def test_a_redis_that_does_not_fsync_each_write_is_named_at_start(
    tmp_path: Path, appendonly: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """From a crash-safety review: the docs offered ``appendfsync everysec``, under which a 2xx
    is not durable and a power failure can bring back a record whose previous bytes were
    already reclaimed. The docs now ask for ``always``, and the store says so at start."""
    with private_redis(tmp_path, appendonly=appendonly) as server:
        store = RedisMetadataStore(server.addr, key_prefix="callfs-persist:", op_timeout=5.0)
        with caplog.at_level(logging.WARNING, logger="callfs.metadata.redis"):
            await store.start()
        await store.close()
    warned = [r.getMessage() for r in caplog.records if "does not fsync" in r.getMessage()]
    if appendonly:
        assert warned == []
    else:
        assert len(warned) == 1 and "appendonly no, appendfsync" in warned[0]
