"""A StorageBackend wrapper that records ``callfs_backend_ops_total`` and
``callfs_backend_op_duration_seconds`` for every byte operation, so no backend repeats it."""

from __future__ import annotations

import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import TypeVar

from callfs.metrics import Metrics
from callfs.storage.base import ByteStream, ObjectStat, StagedObject, StorageBackend

T = TypeVar("T")


class InstrumentedBackend:
    def __init__(self, inner: StorageBackend, metrics: Metrics) -> None:
        self.inner = inner
        self.kind = inner.kind
        self._metrics = metrics

    @asynccontextmanager
    async def _observe(self, operation: str) -> AsyncIterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self._metrics.backend_ops.labels(self.kind, operation).inc()
            self._metrics.backend_duration.labels(self.kind, operation).observe(
                time.perf_counter() - started
            )

    async def _timed(self, operation: str, call: Awaitable[T]) -> T:
        async with self._observe(operation):
            return await call

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    async def stage(self, path: str, chunks: AsyncIterable[bytes]) -> StagedObject:
        staged = await self._timed("write", self.inner.stage(path, chunks))
        return _InstrumentedStaged(staged, self)

    async def open_read(self, path: str, offset: int = 0, length: int | None = None) -> ByteStream:
        return await self._timed("open", self.inner.open_read(path, offset, length))

    async def stat(self, path: str) -> ObjectStat | None:
        return await self._timed("stat", self.inner.stat(path))

    async def mkdir(self, path: str) -> None:
        await self._timed("mkdir", self.inner.mkdir(path))

    async def delete(self, path: str) -> None:
        await self._timed("delete", self.inner.delete(path))

    async def move(self, src: str, dst: str) -> None:
        await self._timed("move", self.inner.move(src, dst))

    def __getattr__(self, name: str) -> object:
        # backend-specific extras (e.g. localfs ``sweep_temp``) stay reachable
        return getattr(self.inner, name)


class _InstrumentedStaged:
    def __init__(self, inner: StagedObject, owner: InstrumentedBackend) -> None:
        self._inner = inner
        self._owner = owner
        self.size = inner.size

    async def publish(self) -> None:
        await self._owner._timed("publish", self._inner.publish())

    async def discard(self) -> None:
        await self._owner._timed("discard", self._inner.discard())
