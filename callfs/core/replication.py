"""The work-queue worker: drains durable background work (HA replica copies, §13).

Writes only queue work (``Engine._enqueue``). Each node runs one worker; it claims items with a
lease, so exactly one worker of the cluster holds an item at a time, applies them with
``Engine.apply_work``, acknowledges what succeeded and hands failures back with a backoff, so a
replica outage catches up once it ends and nothing is lost. ``callfs_replication_backlog`` shows
how many items wait.

The lease is short (``LEASE``) and the worker renews it every ``RENEW_EVERY`` while it applies the
batch, so a copy that takes minutes keeps its items, and the items of a worker that dies (kill -9,
power loss) are due again at most ``LEASE`` after its last renewal; an idle worker finds them
within ``IDLE_POLL``. Leases are stamped with each node's clock: node clocks must agree to well
within ``LEASE - RENEW_EVERY`` (NTP), or a node running ahead may take a live worker's items (then
both apply them, which is harmless, only wasted). A worker whose renewal fails for longer than a
lease (its store unreachable) may find items taken over; it skips those it has not started.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time

from callfs.core.engine import Engine, WorkElsewhere
from callfs.errors import CallFSError
from callfs.jobs.base import WorkItem, WorkQueue
from callfs.metrics import Metrics

log = logging.getLogger(__name__)

BATCH = 64
#: Seconds a claim or a renewal holds an item.
LEASE = 10.0
#: Seconds between renewals of the batch being applied (three per lease: one lost or slow renewal
#: does not lose the items).
RENEW_EVERY = LEASE / 3
#: Seconds between looks for due items when idle (an item queued by this node wakes it at once).
#: On Raft a look that finds nothing due is a read, never a log entry.
IDLE_POLL = 2.0
MAX_BACKOFF = 30.0
#: An item only another node can carry out (``WorkElsewhere``) is due again after this long
#: times its claims, at most ``HAND_BACK_MAX``. A hopeless one (this node replicates nothing, or
#: the blob's node is no member: ``ha`` turned off, a node drained and removed) is dropped with a
#: warning once claimed ``HAND_BACK_LIMIT`` times (failed tries count too); others never are.
HAND_BACK = 2.0
HAND_BACK_MAX = 60.0
HAND_BACK_LIMIT = 1000


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
        """Claim and apply up to one batch, renewing its leases while applying it; returns
        (applied, failed)."""
        items = await self._queue.claim(self.worker_id, BATCH, LEASE, time.time())
        done: list[int] = []
        failed: list[int] = []
        handed: list[WorkItem] = []
        held = {item.id for item in items}
        renewer = asyncio.create_task(self._renew(held), name="callfs-work-renew")
        try:
            for item in items:
                if item.id not in held:
                    continue  # its lease was lost: another worker has the item
                try:
                    await self._engine.apply_work(item)
                    done.append(item.id)
                except WorkElsewhere as exc:
                    if exc.hopeless and item.attempts >= HAND_BACK_LIMIT:
                        log.warning("work item %s dropped: %s", item.kind, exc)
                        self._failed("dropped")
                        done.append(item.id)
                    else:
                        handed.append(item)  # for the node that can: no backoff here
                except (CallFSError, OSError):
                    log.warning(
                        "work item %s failed (attempt %d); retried later", item.kind, item.attempts
                    )
                    self._failed(item.kind.removeprefix("replica-"))
                    failed.append(item.id)
        finally:  # the batch is settled within the lease its last renewal gave
            renewer.cancel()
            await asyncio.wait([renewer])  # (a cancel of this task still propagates)
        if done:
            await self._queue.ack(self.worker_id, done)
        # each later every time it comes back, so that such items never crowd out the others
        waits: dict[float, list[int]] = {}
        for i in handed:
            waits.setdefault(min(HAND_BACK_MAX, HAND_BACK * i.attempts), []).append(i.id)
        for wait, ids in sorted(waits.items()):
            await self._queue.retry(self.worker_id, ids, time.time() + wait)
        if failed:
            self._backoff = min(MAX_BACKOFF, self._backoff * 2)
            await self._queue.retry(self.worker_id, failed, time.time() + self._backoff)
        elif done:
            self._backoff = 0.5
        if self._metrics is not None:
            self._metrics.replication_backlog.set(await self._queue.backlog())
        return len(done), len(failed)

    def _failed(self, what: str) -> None:
        """§16: every logged internal failure counts in ``callfs_errors_total``."""
        if self._metrics is not None:
            self._metrics.errors.labels("replication", what).inc()

    async def _renew(self, held: set[int]) -> None:
        """Renew the leases of ``held`` every ``RENEW_EVERY`` until cancelled; drop from it the
        items whose lease was lost (it ran out while the store was unreachable and another
        worker claimed the item). A failed renewal is logged and tried again next time."""
        while held:
            await asyncio.sleep(RENEW_EVERY)
            ids = sorted(held)
            try:
                kept = await self._queue.renew(self.worker_id, ids, LEASE, time.time())
            except CallFSError:
                log.warning("work item leases not renewed; retrying in %.1f s", RENEW_EVERY)
                continue
            lost = held.difference(kept)
            if lost:
                log.warning("lost the lease of %d work items; another worker has them", len(lost))
                held.difference_update(lost)

    async def _run(self) -> None:
        while True:
            try:
                applied, failed = await self.drain_once()
            except CallFSError:
                log.warning("work queue unreachable; retrying in %.1f s", self._backoff)
                self._failed("queue")  # (it was logged, never counted; found by audit)
                applied, failed = 0, 1
            if failed:
                await asyncio.sleep(self._backoff)
                continue
            if applied:
                continue
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), IDLE_POLL)
