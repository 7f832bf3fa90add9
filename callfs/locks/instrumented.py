"""A LockManager wrapper that records ``callfs_lock_*`` metrics for every acquire and release."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import TracebackType

from callfs.errors import CallFSError
from callfs.locks.base import LockManager
from callfs.metrics import Metrics


class InstrumentedLockManager:
    def __init__(self, inner: LockManager, metrics: Metrics) -> None:
        self.inner = inner
        self._metrics = metrics

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    @property
    def held(self) -> int:
        return self.inner.held

    def hold(self, key: str, timeout: float) -> AbstractAsyncContextManager[None]:
        return self._hold(key, self.inner.hold(key, timeout))

    def _record(self, operation: str, status: str, started: float) -> None:
        self._metrics.lock_ops.labels(operation, status).inc()
        self._metrics.lock_duration.labels(operation).observe(time.perf_counter() - started)

    @asynccontextmanager
    async def _hold(self, key: str, cm: AbstractAsyncContextManager[None]) -> AsyncIterator[None]:
        started = time.perf_counter()
        try:
            await cm.__aenter__()
        except CallFSError as exc:
            self._record("acquire", type(exc).__name__.lower(), started)
            raise
        self._record("acquire", "success", started)
        self._metrics.active_locks.inc()
        exc_info: tuple[type[BaseException] | None, BaseException | None, TracebackType | None]
        exc_info = (None, None, None)
        try:
            yield
        except BaseException as exc:
            exc_info = (type(exc), exc, exc.__traceback__)
            raise
        finally:
            released = time.perf_counter()
            status = "success"
            try:
                await cm.__aexit__(*exc_info)
            except CallFSError:
                status = "lost"
                raise
            finally:
                self._metrics.active_locks.dec()
                self._record("release", status, released)
