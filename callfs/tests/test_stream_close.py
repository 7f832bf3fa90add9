"""A download whose consumer is cancelled (a client gone) while a read of the stored bytes runs in
its thread: ``aclose`` waits for that read before closing the file or the S3 body, so a read never
runs on a closed descriptor (whose number another open may have taken) or a closed response."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from callfs.storage import localfs
from callfs.storage.base import new_blob_key, publish_or_discard
from callfs.storage.localfs import LocalFSBackend
from callfs.storage.s3 import S3Stream

MiB = 1 << 20


async def _consume_until_cancelled(stream: Any, reading: threading.Event) -> None:
    consumer = asyncio.ensure_future(_drain(stream))
    assert await asyncio.to_thread(reading.wait, 10), "no read started"
    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer
    await stream.aclose()


async def _drain(stream: Any) -> None:
    async for _chunk in stream:
        pass


class _SlowBody:
    """A botocore body whose second read takes a while, noting a close that comes during it."""

    def __init__(self) -> None:
        self.reading = threading.Event()
        self.lock = threading.Lock()
        self.in_read = False
        self.closed_during_read = False
        self.reads = 0

    def read(self, n: int) -> bytes:
        with self.lock:
            self.reads += 1
            slow = self.reads == 2
            self.in_read = True
        if slow:
            self.reading.set()
            time.sleep(0.3)
        with self.lock:
            self.in_read = False
        return b"s" * n

    def close(self) -> None:
        with self.lock:
            self.closed_during_read = self.in_read


async def test_an_s3_body_is_closed_only_after_the_read_of_a_cancelled_download() -> None:
    body = _SlowBody()
    await _consume_until_cancelled(S3Stream(body, 64 * MiB), body.reading)
    assert not body.closed_during_read


async def test_a_local_file_is_closed_only_after_the_read_of_a_cancelled_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = LocalFSBackend(str(tmp_path / "root"))
    await backend.start()
    key = new_blob_key()

    async def body() -> AsyncIterator[bytes]:
        yield os.urandom(3 * MiB)

    await publish_or_discard(await backend.stage(key, body()))
    stream = await backend.open_read(key, 0, None)
    real, reading, outcome = os.pread, threading.Event(), []

    def slow_pread(fd: int, n: int, offset: int) -> bytes:
        if offset:  # the second read
            reading.set()
            time.sleep(0.3)
            try:
                os.fstat(fd)
                outcome.append("open")
            except OSError:
                outcome.append("closed under the read")
        return real(fd, n, offset)

    monkeypatch.setattr(localfs.os, "pread", slow_pread)
    await _consume_until_cancelled(stream, reading)
    monkeypatch.undo()
    assert outcome == ["open"]
    await backend.close()
