"""Periodic background chores of a node (link sweep, orphan sweep, erasure repair), owned by the
daemon, and the gate that runs a cluster-wide chore on one node at a time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from callfs.errors import CallFSError, LockTimeout
from callfs.locks.base import LockManager

log = logging.getLogger(__name__)


class Periodic:
    """Run ``chore`` every ``interval`` seconds (first run after ``first_delay``) until closed; a
    failing run is logged and retried at the next interval."""

    def __init__(
        self,
        name: str,
        interval: float,
        chore: Callable[[], Awaitable[object]],
        first_delay: float = 0.0,
    ) -> None:
        self.name = name
        self._interval = interval
        self._chore = chore
        self._first_delay = first_delay
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"callfs-{self.name}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        await asyncio.sleep(self._first_delay)
        while True:
            try:
                await self._chore()
            except (CallFSError, OSError):
                log.warning("%s failed; retrying at the next interval", self.name, exc_info=True)
            await asyncio.sleep(self._interval)


def one_node_at_a_time(
    name: str,
    chore: Callable[[], Awaitable[object]],
    locks: LockManager,
    is_coordinator: Callable[[], bool] | None = None,
) -> Callable[[], Awaitable[None]]:
    """``chore`` for a cluster-wide job (it works on the shared metadata, not on this node's
    disk): on a Raft cluster only the leader runs it; otherwise only the node holding the lock
    ``name`` while it runs (a node finding it held skips this round). A node that dies holding
    the lock frees it when the lock's lease ends (``dlm``: Redis lease; local locks: one node),
    and the next round on another node takes over."""

    async def gated() -> None:
        if is_coordinator is not None:
            if is_coordinator():
                await chore()
            return
        entered = False
        try:
            async with locks.hold(name, 0.1):
                entered = True
                await chore()
        except LockTimeout:
            if entered:
                raise  # from the chore itself, not a busy lock
            log.debug("%s runs on another node this round", name)

    return gated
