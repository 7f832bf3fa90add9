"""The replication worker: drains the durable queue of replica changes (HA, §13).

Writes only queue a change (``Engine._replica_change``); this worker applies them in order with
``Engine.replicate_now``, acknowledges what succeeded, and backs off while the replica is down, so a
replica outage catches up once it ends and nothing is lost. ``callfs_replication_backlog`` shows how
many changes wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from callfs.core.engine import Engine
from callfs.errors import CallFSError
from callfs.metrics import Metrics

log = logging.getLogger(__name__)

BATCH = 64
IDLE_POLL = 5.0
MAX_BACKOFF = 30.0


class ReplicationWorker:
    def __init__(self, engine: Engine, metrics: Metrics | None = None) -> None:
        self._engine = engine
        self._metrics = metrics
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        self._wake.set()

    async def start(self) -> None:
        self._engine.on_replication_queued = self.wake
        self._task = asyncio.create_task(self._run(), name="callfs-replication")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def drain_once(self) -> int:
        """Apply up to one batch; returns how many changes were applied. Raises on the first
        failure after acknowledging the ones before it."""
        meta = self._engine.meta
        batch = await meta.replication_batch(BATCH)
        done: list[int] = []
        try:
            for item_id, path, _op in batch:
                await self._engine.replicate_now(path)
                done.append(item_id)
        finally:
            if done:
                await meta.ack_replication(done)
            if self._metrics is not None:
                self._metrics.replication_backlog.set(await meta.replication_backlog())
        return len(done)

    async def _run(self) -> None:
        backoff = 0.5
        while True:
            try:
                applied = await self.drain_once()
                backoff = 0.5
            except (CallFSError, OSError):
                log.warning("replica unreachable; retrying in %.1f s", backoff)
                await asyncio.sleep(backoff)
                backoff = min(MAX_BACKOFF, backoff * 2)
                continue
            if applied:
                continue
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), IDLE_POLL)
