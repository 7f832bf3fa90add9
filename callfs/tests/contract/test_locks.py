"""The LockManager contract: local and redis pass every test here."""

from __future__ import annotations

import asyncio
import time

import pytest

from callfs.errors import LockTimeout
from callfs.locks.base import LockManager


async def test_mutual_exclusion(lock_manager: LockManager) -> None:
    inside = 0
    peak = 0

    async def worker() -> None:
        nonlocal inside, peak
        async with lock_manager.hold("file:/x", 10):
            inside += 1
            peak = max(peak, inside)
            await asyncio.sleep(0.001)
            inside -= 1

    await asyncio.gather(*(worker() for _ in range(50)))
    assert peak == 1


async def test_waits_instead_of_failing(lock_manager: LockManager) -> None:
    order: list[str] = []

    async def first() -> None:
        async with lock_manager.hold("k", 5):
            order.append("first in")
            await asyncio.sleep(0.3)
            order.append("first out")

    async def second() -> None:
        await asyncio.sleep(0.05)
        async with lock_manager.hold("k", 5):
            order.append("second in")

    await asyncio.gather(first(), second())
    assert order == ["first in", "first out", "second in"]


async def test_timeout(lock_manager: LockManager) -> None:
    async with lock_manager.hold("busy", 5):
        started = time.monotonic()
        with pytest.raises(LockTimeout):
            async with lock_manager.hold("busy", 0.3):
                pass
        waited = time.monotonic() - started
        assert 0.25 <= waited < 3
    async with lock_manager.hold("busy", 1):
        pass


async def test_keys_are_independent_and_release_on_error(lock_manager: LockManager) -> None:
    async with lock_manager.hold("a", 1), lock_manager.hold("b", 1):
        assert lock_manager.held == 2
    assert lock_manager.held == 0
    with pytest.raises(RuntimeError):
        async with lock_manager.hold("a", 1):
            raise RuntimeError("boom")
    async with lock_manager.hold("a", 0.5):
        assert lock_manager.held == 1


async def test_cancelled_waiter_leaves_lock_usable(lock_manager: LockManager) -> None:
    async with lock_manager.hold("c", 1):
        waiter = asyncio.create_task(_take(lock_manager, "c"))
        await asyncio.sleep(0.05)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
    async with lock_manager.hold("c", 1):
        pass
    assert lock_manager.held == 0


async def _take(manager: LockManager, key: str) -> None:
    async with manager.hold(key, 10):
        pass


async def test_no_growth_after_many_keys() -> None:
    from callfs.locks.local import LocalLockManager

    manager = LocalLockManager()
    for i in range(1000):
        async with manager.hold(f"file:/k{i}", 1):
            pass
    assert len(manager) == 0
    # Contended keys, timed-out and cancelled waiters leave nothing behind either.
    for i in range(50):
        async with manager.hold(f"dir:/c{i}", 1):
            waiters = [asyncio.create_task(_take(manager, f"dir:/c{i}")) for _ in range(3)]
            await asyncio.sleep(0)
            waiters[0].cancel()
            with pytest.raises(LockTimeout):
                async with manager.hold(f"dir:/c{i}", 0.001):
                    pass
        results = await asyncio.gather(*waiters, return_exceptions=True)
        assert isinstance(results[0], asyncio.CancelledError) and results[1:] == [None, None]
    assert len(manager) == 0 and manager.held == 0
