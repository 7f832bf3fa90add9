"""The StorageBackend contract: localfs and s3 pass every test here."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from callfs.core.engine import replica_key
from callfs.errors import NotFound, UnsafePath
from callfs.storage.base import StorageBackend, new_blob_key


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def write(backend: StorageBackend, key: str, data: bytes) -> None:
    staged = await backend.stage(
        key, chunks(*(data[i : i + 65536] for i in range(0, len(data), 65536)))
    )
    assert staged.size == len(data)
    await staged.publish()


async def read(
    backend: StorageBackend, key: str, offset: int = 0, length: int | None = None
) -> bytes:
    stream = await backend.open_read(key, offset, length)
    try:
        out = b"".join([c async for c in stream])
        assert len(out) == stream.length
        return out
    finally:
        await stream.aclose()


@pytest.mark.parametrize("size", [0, 1, 65535, 65536, 65537, 3 * 1024 * 1024])
async def test_round_trip(storage: StorageBackend, size: int) -> None:
    data = os.urandom(size)
    key = new_blob_key()
    await write(storage, key, data)
    assert await read(storage, key) == data
    st = await storage.stat(key)
    assert st is not None and st.size == size and not st.is_dir


async def test_nothing_visible_before_publish(storage: StorageBackend) -> None:
    key = new_blob_key()
    staged = await storage.stage(key, chunks(b"hello"))
    assert staged.key == key
    assert await storage.stat(key) is None
    with pytest.raises(NotFound):
        await storage.open_read(key)
    await staged.discard()
    assert await storage.stat(key) is None


async def test_failing_body_propagates_and_leaves_nothing(
    storage: StorageBackend, tmp_path: Path
) -> None:
    class Boom(Exception):
        pass

    async def bad() -> AsyncIterator[bytes]:
        yield b"x" * 100_000
        raise Boom()

    key = new_blob_key()
    with pytest.raises(Boom):
        await storage.stage(key, bad())
    assert await storage.stat(key) is None
    if storage.kind == "localfs":
        tmp = tmp_path / "root" / ".callfs" / "tmp"
        assert list(tmp.iterdir()) == []


async def test_blobs_are_independent_and_reads_survive_delete(storage: StorageBackend) -> None:
    old, new = new_blob_key(), new_blob_key()
    await write(storage, old, b"a" * 200_000)
    reader = await storage.open_read(old)
    await write(storage, new, b"b" * 100_000)
    await storage.delete(old)
    got = b"".join([c async for c in reader])
    await reader.aclose()
    assert got == b"a" * 200_000  # an open read outlives the blob's removal
    assert await read(storage, new) == b"b" * 100_000
    assert await storage.stat(old) is None


async def test_ranges(storage: StorageBackend) -> None:
    key = new_blob_key()
    await write(storage, key, b"0123456789")
    assert await read(storage, key, 2, 3) == b"234"
    assert await read(storage, key, 7) == b"789"
    assert await read(storage, key, 8, 100) == b"89"
    assert await read(storage, key, 10) == b""


async def test_not_found(storage: StorageBackend) -> None:
    with pytest.raises(NotFound):
        await storage.open_read(new_blob_key())
    with pytest.raises(NotFound):
        await storage.delete(new_blob_key())


async def test_list_blobs_and_sweep_temp(storage: StorageBackend) -> None:
    keys = [new_blob_key() for _ in range(3)]
    for key in keys:
        await write(storage, key, b"x")
    await write(storage, replica_key(new_blob_key()), b"copy")  # replica copies are not listed
    assert sorted(await storage.list_blobs(0.0)) == sorted(keys)
    assert await storage.list_blobs(3600.0) == []  # all too young for the sweep
    assert len(await storage.list_blobs(0.0, limit=2)) == 2
    assert await storage.sweep_temp(0.0) == 0


async def test_internal_keys_are_refused(storage: StorageBackend) -> None:
    for key in ("", "/", ".callfs/blobs/aa/bb/x", "/.callfs/tmp/y.part"):
        with pytest.raises(UnsafePath):
            await storage.open_read(key)


async def test_legacy_namespace_keys_are_still_read(storage: StorageBackend) -> None:
    """Files written before blob keys keep their bytes at the namespace path (their key)."""
    await write(storage, "old/dir/file.txt", b"legacy")
    assert await read(storage, "old/dir/file.txt") == b"legacy"
    assert await storage.list_blobs(0.0) == []  # never a sweep candidate
    await storage.delete("old/dir/file.txt")
    assert await storage.stat("old/dir/file.txt") is None


async def test_concurrent_writes(storage: StorageBackend) -> None:
    bodies = {new_blob_key(): bytes([i]) * 150_000 for i in range(8)}
    await asyncio.gather(*(write(storage, k, b) for k, b in bodies.items()))
    for key, body in bodies.items():
        assert await read(storage, key) == body


async def test_symlinks_out_of_the_root_are_refused(tmp_path: Path) -> None:
    from callfs.storage.localfs import LocalFSBackend

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"s")
    backend = LocalFSBackend(str(tmp_path / "root"))
    await backend.start()
    os.symlink(outside, tmp_path / "root" / "escape")
    os.symlink(outside / "secret", tmp_path / "root" / "link")
    with pytest.raises(UnsafePath):
        await backend.open_read("escape/secret")
    with pytest.raises(UnsafePath):
        await backend.open_read("link")
    with pytest.raises(UnsafePath):
        await backend.stage("escape/new", chunks(b"x"))
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
