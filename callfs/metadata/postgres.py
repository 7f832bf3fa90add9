"""PostgreSQL metadata store (asyncpg, a pool): one namespace shared by a cluster.

Same tables as SQLite; names compare in code-point order (``COLLATE "C"``); a subtree is one range
scan on the primary key; multi-row changes run in one transaction; the link consume is a conditional
UPDATE. Every call is bounded by ``op_timeout``; any connection trouble becomes ``Unavailable`` and
the pool reconnects by itself once the server is back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import asyncpg

from callfs.errors import (
    AlreadyExists,
    CallFSError,
    NotFound,
    PermissionDenied,
    Unavailable,
    VersionConflict,
)
from callfs.metadata.base import order_tree
from callfs.metadata.sqlite import pack_layout, subtree_bounds, unpack_layout
from callfs.model import (
    ROOT_OWNER,
    BackendType,
    Entry,
    EntryType,
    ErasureLayout,
    Link,
    LinkStatus,
    name_of,
    parent_of,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Ordered migrations; ``callfs_schema.version`` records how many are applied.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE entries (
        path TEXT COLLATE "C" PRIMARY KEY,
        parent TEXT COLLATE "C" NOT NULL,
        name TEXT COLLATE "C" NOT NULL,
        type TEXT NOT NULL,
        size BIGINT NOT NULL,
        owner TEXT NOT NULL,
        mtime BIGINT NOT NULL,
        backend_type TEXT NOT NULL,
        instance_id TEXT,
        version BIGINT NOT NULL,
        created_at BIGINT NOT NULL,
        erasure_coded BOOLEAN NOT NULL DEFAULT FALSE
    );
    CREATE INDEX entries_children ON entries (parent, (type = 'directory'), name);
    CREATE TABLE links (
        token TEXT PRIMARY KEY,
        path TEXT NOT NULL,
        status TEXT NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        used_at DOUBLE PRECISION,
        used_by_ip TEXT,
        signature TEXT NOT NULL
    );
    CREATE INDEX links_sweep ON links (status, expires_at);
    CREATE TABLE erasure_layouts (file_path TEXT COLLATE "C" PRIMARY KEY, layout BYTEA NOT NULL);
    """,
    """
    CREATE TABLE replication_queue (
        id BIGSERIAL PRIMARY KEY,
        path TEXT NOT NULL,
        op TEXT NOT NULL,
        queued_at DOUBLE PRECISION NOT NULL
    );
    """,
)
_MIGRATION_LOCK = 0x43414C4C46  # "CALLF": serialises migrations of nodes starting together
_COLUMNS = (
    "path, type, size, owner, mtime, backend_type, instance_id, version, created_at, erasure_coded"
)
_UNAVAILABLE = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.exceptions.ConnectionFailureError,
    asyncpg.exceptions.PostgresConnectionError,
)


def _entry(row: Any) -> Entry:
    return Entry(
        path=row["path"],
        type=EntryType(row["type"]),
        size=row["size"],
        owner=row["owner"],
        mtime=row["mtime"],
        backend_type=BackendType(row["backend_type"]),
        instance_id=row["instance_id"],
        version=row["version"],
        created_at=row["created_at"],
        erasure_coded=row["erasure_coded"],
    )


def _link(row: Any) -> Link:
    return Link(
        token=row["token"],
        path=row["path"],
        status=LinkStatus(row["status"]),
        expires_at=row["expires_at"],
        created_at=row["created_at"],
        used_at=row["used_at"],
        used_by_ip=row["used_by_ip"],
        signature=row["signature"],
    )


class PostgresMetadataStore:
    def __init__(
        self, dsn: str, *, op_timeout: float = 5.0, min_size: int = 2, max_size: int = 10
    ) -> None:
        self._dsn = dsn
        self._timeout = op_timeout
        self._min = min_size
        self._max = max_size
        self._pool: asyncpg.Pool | None = None

    async def start(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self._dsn,
                min_size=self._min,
                max_size=self._max,
                timeout=self._timeout,
                command_timeout=self._timeout,
            )
        except (*_UNAVAILABLE, asyncpg.PostgresError) as exc:
            raise Unavailable(f"PostgreSQL unreachable: {type(exc).__name__}") from exc
        await self._run(self._migrate)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def _migrate(self, conn: Any) -> None:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            await conn.execute("CREATE TABLE IF NOT EXISTS callfs_schema (version INT NOT NULL)")
            applied = await conn.fetchval("SELECT max(version) FROM callfs_schema") or 0
            for number, ddl in enumerate(MIGRATIONS[applied:], start=applied + 1):
                await conn.execute(ddl)
                await conn.execute("INSERT INTO callfs_schema (version) VALUES ($1)", number)
                log.info("postgres metadata schema migrated to version %d", number)
            await conn.execute(
                f"INSERT INTO entries ({_COLUMNS}, parent, name) VALUES"
                " ('/', 'directory', 0, $1, 0, 'localfs', NULL, 1, 0, FALSE, '/', '')"
                " ON CONFLICT (path) DO NOTHING",
                ROOT_OWNER,
            )

    async def _run(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        """Run ``fn(conn)`` on a pooled connection within the op timeout; map outages."""
        if self._pool is None:
            raise Unavailable("metadata store is not running")
        try:
            async with asyncio.timeout(self._timeout):
                async with self._pool.acquire() as conn:
                    return await fn(conn)
        except CallFSError:
            raise
        except _UNAVAILABLE as exc:
            raise Unavailable("metadata store unavailable") from exc
        except asyncpg.UniqueViolationError as exc:
            raise AlreadyExists() from exc
        except asyncpg.PostgresError as exc:
            log.error("postgres error: %s", type(exc).__name__)
            raise Unavailable("metadata store error") from exc

    # ---- entries ---------------------------------------------------------------------------
    async def get(self, path: str) -> Entry | None:
        async def op(conn: Any) -> Entry | None:
            row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM entries WHERE path = $1", path)
            return _entry(row) if row else None

        return await self._run(op)

    async def create(self, entry: Entry) -> Entry:
        async def op(conn: Any) -> Entry:
            row = await conn.fetchrow(
                f"INSERT INTO entries ({_COLUMNS}, parent, name)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, 1, $8, $9, $10, $11)"
                f" ON CONFLICT (path) DO NOTHING RETURNING {_COLUMNS}",
                entry.path,
                entry.type.value,
                entry.size,
                entry.owner,
                entry.mtime,
                entry.backend_type.value,
                entry.instance_id,
                entry.created_at,
                entry.erasure_coded,
                parent_of(entry.path),
                name_of(entry.path),
            )
            if row is None:
                raise AlreadyExists()
            return _entry(row)

        return await self._run(op)

    async def update(self, entry: Entry, expected_version: int) -> Entry:
        async def op(conn: Any) -> Entry:
            row = await conn.fetchrow(
                "UPDATE entries SET type = $2, size = $3, owner = $4, mtime = $5,"
                " backend_type = $6, instance_id = $7, version = version + 1, created_at = $8,"
                f" erasure_coded = $9 WHERE path = $1 AND version = $10 RETURNING {_COLUMNS}",
                entry.path,
                entry.type.value,
                entry.size,
                entry.owner,
                entry.mtime,
                entry.backend_type.value,
                entry.instance_id,
                entry.created_at,
                entry.erasure_coded,
                expected_version,
            )
            if row is not None:
                return _entry(row)
            exists = await conn.fetchval("SELECT 1 FROM entries WHERE path = $1", entry.path)
            raise VersionConflict() if exists else NotFound()

        return await self._run(op)

    async def delete(self, path: str, expected_version: int | None = None) -> None:
        if path == "/":
            raise PermissionDenied("the root is never deleted")

        async def op(conn: Any) -> None:
            if expected_version is None:
                done = await conn.fetchval("DELETE FROM entries WHERE path = $1 RETURNING 1", path)
            else:
                done = await conn.fetchval(
                    "DELETE FROM entries WHERE path = $1 AND version = $2 RETURNING 1",
                    path,
                    expected_version,
                )
            if done:
                return
            exists = await conn.fetchval("SELECT 1 FROM entries WHERE path = $1", path)
            raise VersionConflict() if exists else NotFound()

        await self._run(op)

    async def list_children(self, path: str) -> list[Entry]:
        async def op(conn: Any) -> list[Entry]:
            rows = await conn.fetch(
                f"SELECT {_COLUMNS} FROM entries WHERE parent = $1 AND path <> '/'"
                " ORDER BY (type = 'directory'), name",
                path,
            )
            return [_entry(r) for r in rows]

        return await self._run(op)

    async def has_children(self, path: str) -> bool:
        async def op(conn: Any) -> bool:
            found = await conn.fetchval(
                "SELECT 1 FROM entries WHERE parent = $1 AND path <> '/' LIMIT 1", path
            )
            return bool(found)

        return await self._run(op)

    @staticmethod
    async def _descendants(conn: Any, path: str) -> list[Entry]:
        lo, hi = subtree_bounds(path)
        rows = await conn.fetch(
            f"SELECT {_COLUMNS} FROM entries WHERE path > $1 AND path < $2", lo, hi
        )
        return [_entry(r) for r in rows]

    async def list_tree(self, path: str, max_depth: int) -> list[Entry]:
        entries = await self._run(lambda c: self._descendants(c, path))
        return order_tree(path, entries, max_depth)

    async def delete_tree(self, path: str) -> list[Entry]:
        async def op(conn: Any) -> list[Entry]:
            lo, hi = subtree_bounds(path)
            async with conn.transaction():
                rows = await conn.fetch(
                    f"DELETE FROM entries WHERE path > $1 AND path < $2 RETURNING {_COLUMNS}",
                    lo,
                    hi,
                )
            removed = [_entry(r) for r in rows]
            removed.sort(key=lambda e: e.path.count("/"), reverse=True)
            return removed

        return await self._run(op)

    async def move_tree(self, src: str, dst: str) -> None:
        async def op(conn: Any) -> None:
            async with conn.transaction():
                if not await conn.fetchval("SELECT 1 FROM entries WHERE path = $1 FOR UPDATE", src):
                    raise NotFound()
                if await conn.fetchval("SELECT 1 FROM entries WHERE path = $1", dst):
                    raise AlreadyExists()
                lo, hi = subtree_bounds(src)
                cut = len(src) + 1
                await conn.execute(
                    "UPDATE entries SET path = $1, parent = $2, name = $3, version = version + 1"
                    " WHERE path = $4",
                    dst,
                    parent_of(dst),
                    name_of(dst),
                    src,
                )
                await conn.execute(
                    "UPDATE entries SET path = $1 || substr(path, $2),"
                    " parent = $1 || substr(parent, $2), version = version + 1"
                    " WHERE path > $3 AND path < $4",
                    dst,
                    cut,
                    lo,
                    hi,
                )

        await self._run(op)

    # ---- links -----------------------------------------------------------------------------
    async def create_link(self, link: Link) -> None:
        async def op(conn: Any) -> None:
            await conn.execute(
                "INSERT INTO links (token, path, status, expires_at, created_at, used_at,"
                " used_by_ip, signature) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                link.token,
                link.path,
                link.status.value,
                link.expires_at,
                link.created_at,
                link.used_at,
                link.used_by_ip,
                link.signature,
            )

        await self._run(op)

    async def get_link(self, token: str) -> Link | None:
        async def op(conn: Any) -> Link | None:
            row = await conn.fetchrow("SELECT * FROM links WHERE token = $1", token)
            return _link(row) if row else None

        return await self._run(op)

    async def consume_link(self, token: str, used_at: float, used_by_ip: str) -> bool:
        async def op(conn: Any) -> bool:
            done = await conn.fetchval(
                "UPDATE links SET status = 'used', used_at = $2, used_by_ip = $3"
                " WHERE token = $1 AND status = 'active' RETURNING 1",
                token,
                used_at,
                used_by_ip,
            )
            return bool(done)

        return await self._run(op)

    async def sweep_links(self, now: float, used_before: float) -> int:
        async def op(conn: Any) -> int:
            rows = await conn.fetch(
                "DELETE FROM links WHERE (status = 'active' AND expires_at <= $1)"
                " OR (status = 'used' AND used_at < $2) RETURNING 1",
                now,
                used_before,
            )
            return len(rows)

        return await self._run(op)

    # ---- erasure layouts -------------------------------------------------------------------
    async def put_erasure(self, layout: ErasureLayout) -> None:
        blob = pack_layout(layout)

        async def op(conn: Any) -> None:
            await conn.execute(
                "INSERT INTO erasure_layouts (file_path, layout) VALUES ($1, $2)"
                " ON CONFLICT (file_path) DO UPDATE SET layout = excluded.layout",
                layout.file_path,
                blob,
            )

        await self._run(op)

    async def get_erasure(self, path: str) -> ErasureLayout | None:
        async def op(conn: Any) -> ErasureLayout | None:
            blob = await conn.fetchval(
                "SELECT layout FROM erasure_layouts WHERE file_path = $1", path
            )
            return unpack_layout(bytes(blob)) if blob is not None else None

        return await self._run(op)

    async def delete_erasure(self, path: str) -> None:
        async def op(conn: Any) -> None:
            await conn.execute("DELETE FROM erasure_layouts WHERE file_path = $1", path)

        await self._run(op)

    # ---- HA replication queue --------------------------------------------------------------
    async def enqueue_replication(self, path: str, op: str, queued_at: float) -> None:
        async def do(conn: Any) -> None:
            await conn.execute(
                "INSERT INTO replication_queue (path, op, queued_at) VALUES ($1, $2, $3)",
                path,
                op,
                queued_at,
            )

        await self._run(do)

    async def replication_batch(self, limit: int) -> list[tuple[int, str, str]]:
        async def do(conn: Any) -> list[tuple[int, str, str]]:
            rows = await conn.fetch(
                "SELECT id, path, op FROM replication_queue ORDER BY id LIMIT $1", limit
            )
            return [(int(r["id"]), r["path"], r["op"]) for r in rows]

        return await self._run(do)

    async def ack_replication(self, ids: Sequence[int]) -> None:
        done = list(ids)

        async def do(conn: Any) -> None:
            await conn.execute("DELETE FROM replication_queue WHERE id = ANY($1::bigint[])", done)

        await self._run(do)

    async def replication_backlog(self) -> int:
        async def do(conn: Any) -> int:
            return int(await conn.fetchval("SELECT count(*) FROM replication_queue"))

        return await self._run(do)
