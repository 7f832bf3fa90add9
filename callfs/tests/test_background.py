"""one_node_at_a_time: a cluster-wide chore runs on the Raft leader only, or on the node holding
its lock; a busy lock skips the round; a lock timeout from inside the chore is not swallowed."""

from __future__ import annotations

import asyncio

import pytest

from callfs.core.background import one_node_at_a_time
from callfs.errors import LockTimeout
from callfs.locks.local import LocalLockManager


async def test_only_the_coordinator_runs_it() -> None:
    runs: list[str] = []

    async def chore() -> None:
        runs.append("ran")

    locks = LocalLockManager()
    await one_node_at_a_time("job", chore, locks, lambda: False)()
    assert runs == []
    await one_node_at_a_time("job", chore, locks, lambda: True)()
    assert runs == ["ran"]


async def test_a_held_lock_skips_the_round_and_inner_timeouts_propagate() -> None:
    locks = LocalLockManager()
    started, release = asyncio.Event(), asyncio.Event()
    runs: list[int] = []

    async def slow() -> None:
        runs.append(1)
        started.set()
        await release.wait()

    first = asyncio.ensure_future(one_node_at_a_time("job", slow, locks)())
    await started.wait()
    await one_node_at_a_time("job", slow, locks)()  # the lock is held: skipped, no error
    assert runs == [1]
    release.set()
    await first
    await one_node_at_a_time("job", slow, locks)()  # free again: runs
    assert runs == [1, 1]

    async def failing() -> None:
        raise LockTimeout()

    with pytest.raises(LockTimeout):
        await one_node_at_a_time("job", failing, locks)()
