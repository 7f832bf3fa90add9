"""A localfs write cancelled mid-way (a client that went away) waits for the step running in its
thread before cleaning up: no temporary file is created after the cleanup ran, no file is closed
while a thread writes to it, and a publish whose caller gave up leaves no new name behind."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from callfs.core.engine import replica_key
from callfs.storage.base import new_blob_key, publish_or_discard
from callfs.storage.localfs import WRITE_BATCH, LocalFSBackend

MIB = WRITE_BATCH


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    for at in range(0, len(data), 64 * 1024):
        yield data[at : at + 64 * 1024]
        await asyncio.sleep(0)


def _files(root: Path, area: str) -> list[Path]:
    top = root / ".callfs" / area
    return [p for p in top.rglob("*") if p.is_file()] if top.exists() else []


@pytest.fixture
async def backend(tmp_path: Path) -> AsyncIterator[LocalFSBackend]:
    b = LocalFSBackend(str(tmp_path))
    await b.start()
    yield b
    await b.close()


class _SlowStep:
    """Wraps a localfs blocking step. Its ``hop``-th call holds its thread until ``release`` is
    set: before running the real step (``hold="before"``) or after it (``"after"``). ``ready``
    is set when the thread starts holding, ``done`` when the call ends. Records what the real
    step raised."""

    def __init__(self, real: Any, hop: int, hold: str) -> None:
        self.real, self.hop, self.hold = real, hop, hold
        self.calls = 0
        self.ready = threading.Event()
        self.release = threading.Event()
        self.done = threading.Event()
        self.errors: list[BaseException] = []

    def _wait(self) -> None:
        self.ready.set()
        self.release.wait(10)

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        if self.calls != self.hop:
            return self.real(*args)
        try:
            if self.hold == "before":
                self._wait()
            try:
                result = self.real(*args)
            except BaseException as exc:
                self.errors.append(exc)
                raise
            if self.hold == "after":
                self._wait()
            return result
        finally:
            self.done.set()


async def _cancel_when(task: asyncio.Future[Any], step: _SlowStep) -> None:
    """Cancel ``task`` while ``step`` holds its thread, then let the thread go on; return once
    the task and that thread have both ended (what the thread does after the cancel counts)."""
    assert await asyncio.to_thread(step.ready.wait, 10), "the step never ran"
    task.cancel()
    await asyncio.sleep(0.05)  # the old code's cleanup ran here, beside the held thread
    step.release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await asyncio.to_thread(step.done.wait, 10)


@pytest.mark.parametrize("hop", [1, 2], ids=["the hop that creates the file", "a later hop"])
async def test_a_cancelled_stage_waits_for_its_write_and_leaves_no_file(
    backend: LocalFSBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hop: int
) -> None:
    step = _SlowStep(backend._write_blocking, hop, "before")
    monkeypatch.setattr(backend, "_write_blocking", step)
    task = asyncio.ensure_future(backend.stage(new_blob_key(), _chunks(b"w" * (4 * MIB))))
    await _cancel_when(task, step)
    assert step.errors == [], "a write ran into a file closed under it"
    assert _files(tmp_path, "tmp") == []


async def test_a_publish_whose_caller_gave_up_leaves_no_blob(
    backend: LocalFSBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = new_blob_key()
    staged = await backend.stage(key, _chunks(b"p" * (2 * MIB)))
    step = _SlowStep(backend._publish_blocking, 1, "after")  # renamed and fsync'd, then held
    monkeypatch.setattr(backend, "_publish_blocking", step)
    await _cancel_when(asyncio.ensure_future(publish_or_discard(staged)), step)
    assert step.errors == []
    assert await backend.stat(key) is None
    assert _files(tmp_path, "tmp") == [] and _files(tmp_path, "blobs") == []


@pytest.mark.parametrize("case", ["existing name", "replica key"])
async def test_an_interrupted_publish_keeps_a_name_others_may_want(
    backend: LocalFSBackend, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    """Only a fresh blob key that the interrupted publish created is removed by the discard: not
    a name that existed before, nor a replica (or shard) key, which other attempts write again
    and which a committed entry may want."""
    if case == "existing name":
        key = new_blob_key()
        await publish_or_discard(await backend.stage(key, _chunks(b"1" * MIB)))
    else:
        key = replica_key(new_blob_key())
    staged = await backend.stage(key, _chunks(b"2" * MIB))
    step = _SlowStep(backend._publish_blocking, 1, "after")
    monkeypatch.setattr(backend, "_publish_blocking", step)
    await _cancel_when(asyncio.ensure_future(publish_or_discard(staged)), step)
    found = await backend.stat(key)
    assert found is not None and found.size == MIB


async def test_a_cancelled_link_of_a_finished_upload_leaves_no_file(
    backend: LocalFSBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "upload.bin"
    source.write_bytes(b"u" * 1000)
    step = _SlowStep(backend._link_blocking, 1, "before")
    monkeypatch.setattr(backend, "_link_blocking", step)
    task = asyncio.ensure_future(backend.stage_file(new_blob_key(), str(source)))
    await _cancel_when(task, step)
    assert _files(tmp_path, "tmp") == []
    assert source.read_bytes() == b"u" * 1000


async def test_the_discard_never_replaces_the_cancel(
    backend: LocalFSBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The name the interrupted publish created is gone already when the discard comes: the
    caller still sees its cancel, not the discard's NotFound."""
    key = new_blob_key()
    staged = await backend.stage(key, _chunks(b"g" * MIB))
    step = _SlowStep(backend._publish_blocking, 1, "after")
    monkeypatch.setattr(backend, "_publish_blocking", step)
    task = asyncio.ensure_future(publish_or_discard(staged))
    assert await asyncio.to_thread(step.ready.wait, 10)
    for blob in _files(tmp_path, "blobs"):
        blob.unlink()
    await _cancel_when(task, step)
    assert await backend.stat(key) is None
