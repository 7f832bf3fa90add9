"""store_with_copy: one body into the primary and the replica at once; the primary decides."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from callfs.core.tee import store_with_copy
from callfs.errors import NotFound, Unavailable
from callfs.storage.base import new_blob_key
from callfs.storage.localfs import LocalFSBackend

DATA = os.urandom(5 * 1024 * 1024 + 17)


async def body(fail_at: int | None = None) -> AsyncIterator[bytes]:
    for n, i in enumerate(range(0, len(DATA), 256 * 1024)):
        if n == fail_at:
            raise ConnectionResetError("client went away")
        yield DATA[i : i + 256 * 1024]


class Failing:
    """A backend whose stage fails after ``after`` chunks (a dying S3, a full disk)."""

    def __init__(self, inner: LocalFSBackend, after: int) -> None:
        self.inner = inner
        self.after = after

    async def stage(self, key: str, chunks: Any) -> Any:
        async def cut() -> AsyncIterator[bytes]:
            n = 0
            async for chunk in chunks:
                if n == self.after:
                    raise Unavailable("backend died")
                n += 1
                yield chunk

        return await self.inner.stage(key, cut())

    async def delete(self, key: str) -> None:
        await self.inner.delete(key)


async def read(backend: LocalFSBackend, key: str) -> bytes:
    stream = await backend.open_read(key)
    try:
        return b"".join([bytes(c) async for c in stream])
    finally:
        await stream.aclose()


@pytest.fixture
async def two(tmp_path: Path) -> AsyncIterator[tuple[LocalFSBackend, LocalFSBackend]]:
    a, b = LocalFSBackend(str(tmp_path / "a")), LocalFSBackend(str(tmp_path / "b"))
    for x in (a, b):
        os.makedirs(x._configured_root)
        await x.start()
    yield a, b
    for x in (a, b):
        await x.close()


async def test_both_copies_whole(two: tuple[LocalFSBackend, LocalFSBackend]) -> None:
    a, b = two
    key = new_blob_key()
    staged, copied = await store_with_copy(a, key, b, "r/" + key, body())
    assert copied and staged.size == len(DATA)
    assert await read(a, key) == DATA
    assert await read(b, "r/" + key) == DATA


async def test_a_failing_replica_never_fails_the_primary(
    two: tuple[LocalFSBackend, LocalFSBackend],
) -> None:
    a, b = two
    key = new_blob_key()
    replica: Any = Failing(b, 3)
    _, copied = await store_with_copy(a, key, replica, "r/" + key, body())
    assert not copied
    assert await read(a, key) == DATA
    with pytest.raises(NotFound):
        await b.open_read("r/" + key)


@pytest.mark.parametrize("how", ["primary", "body"])
async def test_a_failing_primary_or_body_leaves_nothing(
    two: tuple[LocalFSBackend, LocalFSBackend], how: str
) -> None:
    a, b = two
    key = new_blob_key()
    primary: Any = Failing(a, 5) if how == "primary" else a
    with pytest.raises((Unavailable, ConnectionResetError)):
        await store_with_copy(
            primary,
            key,
            b,
            "r/" + key,
            body(fail_at=9 if how == "body" else None),
        )
    for backend in (a, b):
        root = Path(backend._configured_root)
        assert [p for p in root.rglob("*") if p.is_file()] == []


async def test_a_cancel_while_the_replica_finishes_leaves_nothing(
    two: tuple[LocalFSBackend, LocalFSBackend], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The primary is published and the caller (its client gone) is cancelled while the replica
    copy still publishes: nothing names either copy, so neither stays for the orphan sweep."""
    import asyncio
    import threading

    a, b = two
    key = new_blob_key()
    publishing, release, primary_done = threading.Event(), threading.Event(), threading.Event()
    real_b, real_a = b._publish_blocking, a._publish_blocking

    def held_publish(*args: Any) -> Any:
        publishing.set()
        release.wait(10)
        return real_b(*args)

    def primary_publish(*args: Any) -> Any:
        try:
            return real_a(*args)
        finally:
            primary_done.set()

    monkeypatch.setattr(b, "_publish_blocking", held_publish)
    monkeypatch.setattr(a, "_publish_blocking", primary_publish)
    task = asyncio.ensure_future(store_with_copy(a, key, b, "r/" + key, body()))
    assert await asyncio.to_thread(publishing.wait, 10)
    assert await asyncio.to_thread(primary_done.wait, 10)
    await asyncio.sleep(0.05)  # the primary's task ends: the caller now waits on the replica
    assert await a.stat(key) is not None and not task.done()
    task.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    for backend in (a, b):
        root = Path(backend._configured_root)
        assert [p for p in root.rglob("*") if p.is_file()] == []
