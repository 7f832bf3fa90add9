"""The StorageBackend contract: localfs and s3 pass every test here."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from callfs.core.engine import replica_key
from callfs.errors import CallFSError, NotFound, UnsafePath
from callfs.storage.base import StorageBackend, new_blob_key, publish_or_discard


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
    with pytest.raises(UnsafePath):  # a small body is written at publish: refused there
        await publish_or_discard(await backend.stage("escape/new", chunks(b"x")))
    with pytest.raises(UnsafePath):  # a bigger one at its first write
        await backend.stage("escape/big", chunks(b"x" * (3 << 20)))
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    assert list((tmp_path / "root" / ".callfs" / "tmp").iterdir()) == []


async def test_list_keys_pages_every_area(storage: StorageBackend) -> None:
    """``list_keys``: blobs, replica copies and shards, in key order, paged with ``after``."""
    from callfs.storage.base import AREA_BLOBS, AREA_REPLICAS, AREA_SHARDS, AREA_TEMP

    blobs = sorted(new_blob_key() for _ in range(5))
    for i, key in enumerate(blobs):
        await write(storage, key, b"x" * i)
    copy = replica_key(new_blob_key())
    await write(storage, copy, b"copy")
    upload = new_blob_key()
    shards = [f".erasure/{upload}/{i}" for i in (0, 1, 2)]
    for key in shards:
        await write(storage, key, b"shard")
    await write(storage, "legacy/file.txt", b"legacy")  # never listed

    listed = await storage.list_keys(AREA_BLOBS)
    assert [o.key for o in listed] == blobs
    assert [o.size for o in listed] == [0, 1, 2, 3, 4]
    assert all(o.mtime > 0 for o in listed)
    first = await storage.list_keys(AREA_BLOBS, limit=2)
    rest = await storage.list_keys(AREA_BLOBS, after=first[-1].key, limit=10)
    assert [o.key for o in first + rest] == blobs
    assert await storage.list_keys(AREA_BLOBS, after=blobs[-1]) == []
    assert [o.key for o in await storage.list_keys(AREA_REPLICAS)] == [copy]
    got = await storage.list_keys(AREA_SHARDS)
    assert [o.key for o in got] == shards and {o.size for o in got} == {5}
    assert [o.key for o in await storage.list_keys(AREA_SHARDS, after=shards[0])] == shards[1:]
    for obj in got:  # shard keys are what stat and delete take
        assert await storage.stat(obj.key) is not None
    assert await storage.list_keys(AREA_TEMP) == []
    with pytest.raises(CallFSError):
        await storage.list_keys("nope")


@pytest.mark.parametrize("size", [0, 1, 3 * 1024 * 1024 + 1])
async def test_stage_file_takes_a_local_files_bytes(
    storage: StorageBackend, tmp_path: Path, size: int
) -> None:
    """``stage_file``: a durable local file (a finished resumable upload) staged like a body;
    invisible until publish; the source stays; localfs links it (no copy) when it can."""
    data = os.urandom(size)
    source = tmp_path / "root" / ".callfs" / "uploads-test.part"
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_bytes(data)
    key = new_blob_key()
    staged = await storage.stage_file(key, str(source))
    assert staged.key == key and staged.size == size
    assert await storage.stat(key) is None
    await staged.publish()
    assert await read(storage, key) == data
    assert source.read_bytes() == data
    if storage.kind == "localfs":
        blob = tmp_path / "root" / ".callfs" / "blobs" / key[:2] / key[2:4] / key
        assert blob.stat().st_ino == source.stat().st_ino  # the same file: no copy
        source.unlink()  # the upload's copy goes after the commit; the blob stays
        assert await read(storage, key) == data
    # discard leaves nothing readable and never touches the source
    other = tmp_path / "other.part"
    other.write_bytes(b"abc")
    key2 = new_blob_key()
    staged = await storage.stage_file(key2, str(other))
    await staged.discard()
    assert await storage.stat(key2) is None
    assert other.read_bytes() == b"abc"


async def test_stage_file_of_a_missing_source_is_not_found(
    storage: StorageBackend, tmp_path: Path
) -> None:
    with pytest.raises(NotFound):
        await storage.stage_file(new_blob_key(), str(tmp_path / "missing.part"))
