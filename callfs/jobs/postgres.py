"""The WorkQueue in PostgreSQL (table ``work_queue``): a claim is one UPDATE over rows picked with
``FOR UPDATE SKIP LOCKED``, so concurrent workers of a cluster never lease the same item."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from callfs.jobs.base import WorkItem
from callfs.metadata.postgres import PostgresMetadataStore


class PostgresWorkQueue:
    def __init__(self, store: PostgresMetadataStore) -> None:
        self._store = store

    async def start(self) -> None:
        return None  # the store's lifecycle owns the pool

    async def close(self) -> None:
        return None

    async def enqueue(self, kind: str, key: str, arg: str, now: float) -> None:
        async def op(conn: Any) -> None:
            await conn.execute(
                "INSERT INTO work_queue (kind, key, arg, queued_at) VALUES ($1, $2, $3, $4)",
                kind,
                key,
                arg,
                now,
            )

        await self._store.run(op)

    async def claim(self, worker: str, limit: int, lease: float, now: float) -> list[WorkItem]:
        async def op(conn: Any) -> list[WorkItem]:
            rows = await conn.fetch(
                "UPDATE work_queue SET lease_owner = $1, lease_until = $2,"
                " attempts = attempts + 1 WHERE id IN (SELECT id FROM work_queue"
                " WHERE lease_until <= $3 ORDER BY id LIMIT $4 FOR UPDATE SKIP LOCKED)"
                " RETURNING id, kind, key, arg, attempts",
                worker,
                now + lease,
                now,
                limit,
            )
            items = [WorkItem(r[0], r[1], r[2], r[3], r[4]) for r in rows]
            return sorted(items, key=lambda i: i.id)

        return await self._store.run(op)

    async def renew(self, worker: str, ids: Sequence[int], lease: float, now: float) -> list[int]:
        held = list(ids)
        if not held:
            return []

        async def op(conn: Any) -> list[int]:
            rows = await conn.fetch(
                "UPDATE work_queue SET lease_until = $1"
                " WHERE id = ANY($2::bigint[]) AND lease_owner = $3 RETURNING id",
                now + lease,
                held,
                worker,
            )
            return sorted(int(r[0]) for r in rows)

        return await self._store.run(op)

    async def ack(self, worker: str, ids: Sequence[int]) -> None:
        done = list(ids)

        async def op(conn: Any) -> None:
            await conn.execute(
                "DELETE FROM work_queue WHERE id = ANY($1::bigint[]) AND lease_owner = $2",
                done,
                worker,
            )

        await self._store.run(op)

    async def retry(self, worker: str, ids: Sequence[int], not_before: float) -> None:
        again = list(ids)

        async def op(conn: Any) -> None:
            await conn.execute(
                "UPDATE work_queue SET lease_owner = NULL, lease_until = $1"
                " WHERE id = ANY($2::bigint[]) AND lease_owner = $3",
                not_before,
                again,
                worker,
            )

        await self._store.run(op)

    async def backlog(self) -> int:
        async def op(conn: Any) -> int:
            return int(await conn.fetchval("SELECT count(*) FROM work_queue"))

        return await self._store.run(op)
