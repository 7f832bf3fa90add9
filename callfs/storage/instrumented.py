"""A StorageBackend wrapper that records ``callfs_backend_ops_total`` and
``callfs_backend_op_duration_seconds`` for every byte operation, so no backend repeats it."""

from __future__ import annotations

import time
from collections.abc import AsyncIterable, Awaitable
from typing import TypeVar

from callfs.metrics import Metrics
from callfs.storage.base import (
    ByteStream,
    Chunk,
    ObjectStat,
    StagedObject,
    StorageBackend,
    StoredObject,
)

T = TypeVar("T")


class InstrumentedBackend:
    def __init__(self, inner: StorageBackend, metrics: Metrics) -> None:
        self.inner = inner
        self.kind = inner.kind
        self._metrics = metrics

    async def _timed(self, operation: str, call: Awaitable[T]) -> T:
        started = time.perf_counter()
        try:
            return await call
        finally:  # labels() answers from its cache (callfs.metrics)
            self._metrics.backend_ops.labels(self.kind, operation).inc()
            self._metrics.backend_duration.labels(self.kind, operation).observe(
                time.perf_counter() - started
            )

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    async def stage(self, key: str, chunks: AsyncIterable[Chunk]) -> StagedObject:
        staged = await self._timed("write", self.inner.stage(key, chunks))
        return _InstrumentedStaged(staged, self)

    async def stage_file(self, key: str, source: str) -> StagedObject:
        staged = await self._timed("write", self.inner.stage_file(key, source))
        return _InstrumentedStaged(staged, self)

    async def open_read(self, key: str, offset: int = 0, length: int | None = None) -> ByteStream:
        return await self._timed("open", self.inner.open_read(key, offset, length))

    async def stat(self, key: str) -> ObjectStat | None:
        return await self._timed("stat", self.inner.stat(key))

    async def delete(self, key: str) -> None:
        await self._timed("delete", self.inner.delete(key))

    async def list_blobs(self, older_than: float, limit: int = 10_000) -> list[str]:
        return await self._timed("list", self.inner.list_blobs(older_than, limit))

    async def sweep_temp(self, older_than: float) -> int:
        return await self._timed("sweep", self.inner.sweep_temp(older_than))

    async def list_keys(self, area: str, after: str = "", limit: int = 1000) -> list[StoredObject]:
        return await self._timed("list", self.inner.list_keys(area, after, limit))


class _InstrumentedStaged:
    def __init__(self, inner: StagedObject, owner: InstrumentedBackend) -> None:
        self._inner = inner
        self._owner = owner
        self.key = inner.key
        self.size = inner.size

    async def publish(self) -> None:
        await self._owner._timed("publish", self._inner.publish())

    async def discard(self) -> None:
        await self._owner._timed("discard", self._inner.discard())
