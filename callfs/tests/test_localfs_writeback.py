"""localfs starts writing a big body to disk while it streams (``start_writeback``), so the
fsync at publish does not write the whole file at the end; small bodies are left to that fsync."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from callfs.storage import localfs
from callfs.storage.base import new_blob_key
from callfs.storage.localfs import WRITE_BATCH, LocalFSBackend


async def _chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for at in range(0, len(data), size):
        yield data[at : at + size]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_sync_file_range_is_found_and_accepts_a_file(tmp_path: Path) -> None:
    assert localfs._SYNC_FILE_RANGE is not None, "the head start would be silently off"
    path = tmp_path / "f"
    path.write_bytes(b"x" * 10_000)
    fd = os.open(path, os.O_WRONLY)
    try:
        assert localfs._SYNC_FILE_RANGE(fd, 0, 10_000, localfs._SYNC_FILE_RANGE_WRITE) == 0
    finally:
        os.close(fd)


async def test_a_big_body_is_written_back_as_it_streams(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[int, int]] = []
    real = localfs._SYNC_FILE_RANGE

    def recording(fd: int, offset: int, length: int, flags: int) -> int:
        calls.append((offset, length))
        return real(fd, offset, length, flags) if real is not None else 0

    monkeypatch.setattr(localfs, "_SYNC_FILE_RANGE", recording)
    backend = LocalFSBackend(str(tmp_path / "root"))
    await backend.start()
    try:
        data = os.urandom(3 * WRITE_BATCH + 12_345)
        key = new_blob_key()
        staged = await backend.stage(key, _chunks(data, 64 * 1024))
        await staged.publish()
        # every full batch once, in order, without gaps; the tail is left to publish's fsync
        assert calls == [(i * WRITE_BATCH, WRITE_BATCH) for i in range(3)]
        stream = await backend.open_read(key, 0, None)
        try:
            assert b"".join([c async for c in stream]) == data
        finally:
            await stream.aclose()

        calls.clear()
        small = await backend.stage(new_blob_key(), _chunks(b"s" * 4096, 4096))
        await small.publish()
        assert calls == []
    finally:
        await backend.close()


@pytest.mark.parametrize("made", [None, []], ids=["fsync-now", "fsync-later"])
def test_a_directory_another_writer_just_made_is_fsyncd_by_this_writer_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, made: list[int] | None
) -> None:
    """From a crash-safety review: when two writers make the same new blob directory, the one
    whose mkdir lost the race skipped the parent's fsync, so its acknowledged blob depended on
    the other writer's fsync, which may never come (it can fail first)."""
    parent = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    synced: list[int] = []
    real_mkdir, real_fsync = os.mkdir, os.fsync

    def racing_mkdir(name: str, mode: int = 0o777, *, dir_fd: int | None = None) -> None:
        real_mkdir(name, mode, dir_fd=dir_fd)  # the other writer got there first
        raise FileExistsError(name)

    def fsync(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(os, "mkdir", racing_mkdir)
    monkeypatch.setattr(os, "fsync", fsync)
    try:
        child = localfs._open_child_dir(parent, "ab", 0o700, made)
        os.close(child)
        if made is not None:
            assert len(made) == 1  # the caller fsyncs it once its file is in place
            for fd in made:
                fsync(fd)
                os.close(fd)
        assert synced == [os.fstat(parent).st_ino]
    finally:
        os.close(parent)
