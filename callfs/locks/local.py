"""In-process locks (``dlm.type: local``): correct for a single node only."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from callfs.errors import LockTimeout


class _Slot:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()  # FIFO among waiters
        self.users = 0


class LocalLockManager:
    """One ``asyncio.Lock`` per key, created on demand and dropped when nobody holds or waits for
    it, so memory does not grow with the number of keys ever locked."""

    def __init__(self) -> None:
        self._slots: dict[str, _Slot] = {}
        self._held = 0

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self._slots.clear()

    @property
    def held(self) -> int:
        return self._held

    def __len__(self) -> int:
        return len(self._slots)

    def hold(self, key: str, timeout: float) -> AbstractAsyncContextManager[None]:
        return self._hold(key, timeout)

    @asynccontextmanager
    async def _hold(self, key: str, wait: float) -> AsyncIterator[None]:
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = _Slot()
        slot.users += 1
        try:
            try:
                async with asyncio.timeout(wait):
                    await slot.lock.acquire()
            except TimeoutError as exc:
                raise LockTimeout() from exc
            self._held += 1
            try:
                yield
            finally:
                self._held -= 1
                slot.lock.release()
        finally:
            slot.users -= 1
            if slot.users == 0 and self._slots.get(key) is slot:
                del self._slots[key]
