"""The WorkQueue in the node's SQLite database (table ``work_queue``), written through the
metadata store's single writer thread (one group commit for both)."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from callfs.jobs.base import WorkItem
from callfs.metadata.sqlite import SqliteMetadataStore


class SqliteWorkQueue:
    def __init__(self, store: SqliteMetadataStore) -> None:
        self._store = store

    async def start(self) -> None:
        return None  # the store's lifecycle owns the database

    async def close(self) -> None:
        return None

    async def enqueue(self, kind: str, key: str, arg: str, now: float) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO work_queue (kind, key, arg, queued_at) VALUES (?, ?, ?, ?)",
                (kind, key, arg, now),
            )

        await self._store.run_write(op)

    async def claim(self, worker: str, limit: int, lease: float, now: float) -> list[WorkItem]:
        def op(conn: sqlite3.Connection) -> list[WorkItem]:
            rows = conn.execute(
                "SELECT id, kind, key, arg, attempts FROM work_queue WHERE lease_until <= ?"
                " ORDER BY id LIMIT ?",
                (now, limit),
            ).fetchall()
            conn.executemany(
                "UPDATE work_queue SET lease_owner = ?, lease_until = ?, attempts = attempts + 1"
                " WHERE id = ?",
                [(worker, now + lease, r[0]) for r in rows],
            )
            return [WorkItem(r[0], r[1], r[2], r[3], r[4] + 1) for r in rows]

        return await self._store.run_write(op)

    async def ack(self, worker: str, ids: Sequence[int]) -> None:
        done = [(i, worker) for i in ids]

        def op(conn: sqlite3.Connection) -> None:
            conn.executemany("DELETE FROM work_queue WHERE id = ? AND lease_owner = ?", done)

        await self._store.run_write(op)

    async def retry(self, worker: str, ids: Sequence[int], not_before: float) -> None:
        again = [(not_before, i, worker) for i in ids]

        def op(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE work_queue SET lease_owner = NULL, lease_until = ?"
                " WHERE id = ? AND lease_owner = ?",
                again,
            )

        await self._store.run_write(op)

    async def backlog(self) -> int:
        def op(conn: sqlite3.Connection) -> int:
            return int(conn.execute("SELECT count(*) FROM work_queue").fetchone()[0])

        return await self._store.run_read(op)
