"""The SQLite store's writer waits for another process's write transaction (``server.workers``,
a CLI beside the server) in short steps, not in SQLite's own 25-100 ms sleeps."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from callfs.errors import Unavailable
from callfs.metadata import sqlite as sqlite_store
from callfs.metadata.sqlite import SqliteMetadataStore
from callfs.model import BackendType, Entry, EntryType


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteMetadataStore]:
    s = SqliteMetadataStore(str(tmp_path / "meta.sqlite3"))
    await s.start()
    yield s
    await s.close()


def _file(path: str) -> Entry:
    return Entry(
        path=path,
        type=EntryType.FILE,
        size=1,
        owner="alice",
        mtime=1,
        backend_type=BackendType.LOCALFS,
        instance_id="n1",
        version=1,
        created_at=1,
        blob_key="0" * 32,
    )


def _hold_write_lock(path: str, seconds: float) -> float:
    """Another connection (another process, as far as the lock goes) holds the write lock for
    ``seconds``; returns when it let go."""
    other = sqlite3.connect(path, isolation_level=None, timeout=10)
    try:
        other.execute("BEGIN IMMEDIATE")
        time.sleep(seconds)
        other.execute("COMMIT")
        return time.monotonic()
    finally:
        other.close()


async def test_a_write_waiting_for_another_writer_goes_on_at_once_after_it(
    store: SqliteMetadataStore,
) -> None:
    late = []
    for attempt in range(3):
        holder = asyncio.ensure_future(asyncio.to_thread(_hold_write_lock, store.path, 0.3))
        await asyncio.sleep(0.05)  # the lock is held now
        created = await store.create(_file(f"/f{attempt}"), None)
        done = time.monotonic()
        released = await holder
        assert created.path == f"/f{attempt}"
        late.append(done - released)
    # SQLite's busy handler sleeps 50-100 ms between two tries by then (the old code went on
    # 80 ms after the release); this one tries again every 2 ms
    assert sorted(late)[1] < 0.03, late


async def test_a_write_lock_held_past_the_limit_fails_the_write(
    store: SqliteMetadataStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_store, "_BUSY_LIMIT", 0.2)
    holder = asyncio.ensure_future(asyncio.to_thread(_hold_write_lock, store.path, 0.6))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    with pytest.raises(Unavailable):
        await store.create(_file("/late"), None)
    assert 0.15 < time.monotonic() - started < 0.5
    await holder
    assert (await store.create(_file("/late"), None)).path == "/late"  # nothing was half-done
