"""The WorkQueue of a Raft cluster: the ``work_queue`` table of the replicated state, every
change a Raft command (so a lease is granted once, cluster-wide, and survives any node). A claim
with nothing due stays a read: an idle worker adds nothing to the log."""

from __future__ import annotations

from collections.abc import Sequence

from callfs.jobs.base import WorkItem
from callfs.metadata import raft_commands as C
from callfs.metadata import sqlite_ops as ops
from callfs.metadata.raft import ReplicatedLog


class RaftWorkQueue:
    def __init__(self, service: ReplicatedLog) -> None:
        self._service = service

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def enqueue(self, kind: str, key: str, arg: str, now: float) -> None:
        await self._service.execute("wq_enqueue", [kind, key, arg, now])

    async def claim(self, worker: str, limit: int, lease: float, now: float) -> list[WorkItem]:
        # An idle poll commits nothing: a read (after the read barrier) first asks whether any item
        # is due; only then does a claim go through the log.
        if not await self._service.read(lambda c: ops.wq_due(c, now)):
            return []
        rows = await self._service.execute("wq_claim", [worker, limit, lease, now])
        return [C.work_in(r) for r in rows]

    async def renew(self, worker: str, ids: Sequence[int], lease: float, now: float) -> list[int]:
        if not ids:
            return []
        renewed: list[int] = await self._service.execute(
            "wq_renew", [worker, list(ids), lease, now]
        )
        return renewed

    async def ack(self, worker: str, ids: Sequence[int]) -> None:
        await self._service.execute("wq_ack", [worker, list(ids)])

    async def retry(self, worker: str, ids: Sequence[int], not_before: float) -> None:
        await self._service.execute("wq_retry", [worker, list(ids), not_before])

    async def backlog(self) -> int:
        return await self._service.read(ops.wq_backlog)
