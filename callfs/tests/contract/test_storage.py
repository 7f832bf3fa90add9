"""The StorageBackend contract: localfs and s3 pass every test here."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from callfs.errors import DirectoryNotEmpty, NotFound, UnsafePath
from callfs.storage.base import StorageBackend


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def write(backend: StorageBackend, path: str, data: bytes) -> None:
    staged = await backend.stage(
        path, chunks(*(data[i : i + 65536] for i in range(0, len(data), 65536)))
    )
    assert staged.size == len(data)
    await staged.publish()


async def read(
    backend: StorageBackend, path: str, offset: int = 0, length: int | None = None
) -> bytes:
    stream = await backend.open_read(path, offset, length)
    try:
        out = b"".join([c async for c in stream])
        assert len(out) == stream.length
        return out
    finally:
        await stream.aclose()


@pytest.mark.parametrize("size", [0, 1, 65535, 65536, 65537, 3 * 1024 * 1024])
async def test_round_trip(storage: StorageBackend, size: int) -> None:
    data = os.urandom(size)
    await write(storage, f"/dir/f{size}.bin", data)
    assert await read(storage, f"/dir/f{size}.bin") == data
    st = await storage.stat(f"/dir/f{size}.bin")
    assert st is not None and st.size == size and not st.is_dir


async def test_nothing_visible_before_publish(storage: StorageBackend) -> None:
    staged = await storage.stage("/p.txt", chunks(b"hello"))
    assert await storage.stat("/p.txt") is None
    with pytest.raises(NotFound):
        await storage.open_read("/p.txt")
    await staged.discard()
    assert await storage.stat("/p.txt") is None


async def test_failing_body_propagates_and_leaves_nothing(
    storage: StorageBackend, tmp_path: Path
) -> None:
    class Boom(Exception):
        pass

    async def bad() -> AsyncIterator[bytes]:
        yield b"x" * 100_000
        raise Boom()

    with pytest.raises(Boom):
        await storage.stage("/bad.bin", bad())
    assert await storage.stat("/bad.bin") is None
    if storage.kind == "localfs":
        tmp = tmp_path / "root" / ".callfs-tmp"
        assert list(tmp.iterdir()) == []


async def test_publish_replaces_whole(storage: StorageBackend) -> None:
    await write(storage, "/r.bin", b"a" * 200_000)
    reader = await storage.open_read("/r.bin")
    await write(storage, "/r.bin", b"b" * 100_000)
    old = b"".join([c async for c in reader])
    await reader.aclose()
    assert old == b"a" * 200_000
    assert await read(storage, "/r.bin") == b"b" * 100_000


async def test_ranges(storage: StorageBackend) -> None:
    await write(storage, "/range.txt", b"0123456789")
    assert await read(storage, "/range.txt", 2, 3) == b"234"
    assert await read(storage, "/range.txt", 7) == b"789"
    assert await read(storage, "/range.txt", 8, 100) == b"89"
    assert await read(storage, "/range.txt", 10) == b""


async def test_not_found(storage: StorageBackend) -> None:
    with pytest.raises(NotFound):
        await storage.open_read("/missing")
    with pytest.raises(NotFound):
        await storage.delete("/missing")
    with pytest.raises(NotFound):
        await storage.move("/missing", "/elsewhere")
    await storage.mkdir("/adir")
    with pytest.raises(NotFound):
        await storage.open_read("/adir")


async def test_directories(storage: StorageBackend) -> None:
    await storage.mkdir("/x/y/z")
    await storage.mkdir("/x/y/z")
    st = await storage.stat("/x/y")
    assert st is not None and st.is_dir
    await write(storage, "/x/y/z/f", b"1")
    with pytest.raises(DirectoryNotEmpty):
        await storage.delete("/x/y/z")
    await storage.delete("/x/y/z/f")
    await storage.delete("/x/y/z")
    assert await storage.stat("/x/y/z") is None


async def test_move_file_and_tree(storage: StorageBackend) -> None:
    await write(storage, "/m/a.txt", b"A")
    await write(storage, "/m/sub/b.txt", b"B")
    await storage.move("/m/a.txt", "/n/deep/a2.txt")
    assert await read(storage, "/n/deep/a2.txt") == b"A"
    assert await storage.stat("/m/a.txt") is None
    await storage.move("/m", "/moved")
    assert await read(storage, "/moved/sub/b.txt") == b"B"
    assert await storage.stat("/m/sub/b.txt") is None
    await write(storage, "/t1", b"one")
    await write(storage, "/t2", b"two")
    await storage.move("/t1", "/t2")
    assert await read(storage, "/t2") == b"one"


async def test_concurrent_publishes_leave_one_whole_version(storage: StorageBackend) -> None:
    bodies = [bytes([i]) * 150_000 for i in range(8)]
    await asyncio.gather(*(write(storage, "/same.bin", b) for b in bodies))
    assert await read(storage, "/same.bin") in bodies


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
        await backend.open_read("/escape/secret")
    with pytest.raises(UnsafePath):
        await backend.open_read("/link")
    with pytest.raises(UnsafePath):
        await backend.stage("/escape/new", chunks(b"x"))
    with pytest.raises(UnsafePath):
        await backend.mkdir("/escape/d")
    with pytest.raises(UnsafePath):
        await backend.move("/link", "/escape/moved")
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
