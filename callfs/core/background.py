"""Periodic background chores of a node (link sweep, orphan sweep), owned by the daemon."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from callfs.errors import CallFSError

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
