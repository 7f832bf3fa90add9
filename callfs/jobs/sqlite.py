"""The WorkQueue in the node's SQLite database (table ``work_queue``), written through the
metadata store's single writer thread (one group commit for both)."""

from __future__ import annotations

from collections.abc import Sequence

from callfs.jobs.base import WorkItem
from callfs.metadata import sqlite_ops as ops
from callfs.metadata.sqlite import SqliteMetadataStore


class SqliteWorkQueue:
    def __init__(self, store: SqliteMetadataStore) -> None:
        self._store = store

    async def start(self) -> None:
        return None  # the store's lifecycle owns the database

    async def close(self) -> None:
        return None

    async def enqueue(self, kind: str, key: str, arg: str, now: float) -> None:
        await self._store.run_write(lambda c: ops.wq_enqueue(c, kind, key, arg, now))

    async def claim(self, worker: str, limit: int, lease: float, now: float) -> list[WorkItem]:
        return await self._store.run_write(lambda c: ops.wq_claim(c, worker, limit, lease, now))

    async def renew(self, worker: str, ids: Sequence[int], lease: float, now: float) -> list[int]:
        if not ids:
            return []
        return await self._store.run_write(lambda c: ops.wq_renew(c, worker, ids, lease, now))

    async def ack(self, worker: str, ids: Sequence[int]) -> None:
        await self._store.run_write(lambda c: ops.wq_ack(c, worker, ids))

    async def retry(self, worker: str, ids: Sequence[int], not_before: float) -> None:
        await self._store.run_write(lambda c: ops.wq_retry(c, worker, ids, not_before))

    async def backlog(self) -> int:
        return await self._store.run_read(ops.wq_backlog)
