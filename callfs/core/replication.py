"""The work-queue worker: drains durable background work (HA replica copies, §13).

Writes only queue work (``Engine._enqueue``). Each node runs one worker; it claims items with a
lease, so exactly one worker of the cluster holds an item at a time, applies them with
``Engine.apply_work``, acknowledges what succeeded and hands failures back with a backoff, so a
replica outage catches up once it ends and nothing is lost. A worker that dies lets its leases run
out and another takes the items. ``callfs_replication_backlog`` shows how many items wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time

from callfs.core.engine import Engine
from callfs.errors import CallFSError
from callfs.jobs.base import WorkQueue
from callfs.metrics import Metrics

log = logging.getLogger(__name__)

BATCH = 64
LEASE = 60.0
IDLE_POLL = 5.0
MAX_BACKOFF = 30.0


class WorkQueueWorker:
    def __init__(
        self, engine: Engine, queue: WorkQueue, instance_id: str, metrics: Metrics | None = None
    ) -> None:
        self._engine = engine
        self._queue = queue
        self._metrics = metrics
        self.worker_id = f"{instance_id}/{os.getpid()}/{os.urandom(4).hex()}"
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._backoff = 0.5

    def wake(self) -> None:
        self._wake.set()

    async def start(self) -> None:
        self._engine.on_work_queued = self.wake
        self._task = asyncio.create_task(self._run(), name="callfs-work-queue")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def drain_once(self) -> tuple[int, int]:
        """Claim and apply up to one batch; returns (applied, failed)."""
        now = time.time()
        items = await self._queue.claim(self.worker_id, BATCH, LEASE, now)
        done: list[int] = []
        failed: list[int] = []
        for item in items:
            try:
                await self._engine.apply_work(item)
                done.append(item.id)
            except (CallFSError, OSError):
                log.warning(
                    "work item %s failed (attempt %d); retried later", item.kind, item.attempts
                )
                failed.append(item.id)
        if done:
            await self._queue.ack(self.worker_id, done)
        if failed:
            self._backoff = min(MAX_BACKOFF, self._backoff * 2)
            await self._queue.retry(self.worker_id, failed, time.time() + self._backoff)
        elif done:
            self._backoff = 0.5
        if self._metrics is not None:
            self._metrics.replication_backlog.set(await self._queue.backlog())
        return len(done), len(failed)

    async def _run(self) -> None:
        while True:
            try:
                applied, failed = await self.drain_once()
            except CallFSError:
                log.warning("work queue unreachable; retrying in %.1f s", self._backoff)
                applied, failed = 0, 1
            if failed:
                await asyncio.sleep(self._backoff)
                continue
            if applied:
                continue
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), IDLE_POLL)
