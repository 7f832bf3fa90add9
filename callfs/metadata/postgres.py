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
    Unavailable,
)
from callfs.metadata.base import ChildPosition
from callfs.metadata.common import (
    ENTRY_COLUMNS,
    ROOT,
    Plan,
    ancestors,
    create_reads,
    entry_from_row,
    entry_to_row,
    move_reads,
    order_tree,
    pack_layout,
    plan_create,
    plan_delete,
    plan_delete_tree,
    plan_move,
    plan_update,
    subtree_bounds,
    unpack_layout,
)
from callfs.model import Entry, EntryType, ErasureLayout, Link, LinkStatus, NewParents, Placement

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
    # Placement records name immutable blobs (see sqlite.py's migration 3).
    """
    ALTER TABLE entries ADD COLUMN blob_key TEXT;
    UPDATE entries SET blob_key = substr(path, 2) WHERE type = 'file';
    CREATE INDEX entries_blob ON entries (blob_key) WHERE blob_key IS NOT NULL;
    DROP TABLE replication_queue;
    CREATE TABLE work_queue (
        id BIGSERIAL PRIMARY KEY,
        kind TEXT NOT NULL,
        key TEXT NOT NULL,
        arg TEXT NOT NULL,
        queued_at DOUBLE PRECISION NOT NULL,
        lease_owner TEXT,
        lease_until DOUBLE PRECISION NOT NULL DEFAULT 0,
        attempts INT NOT NULL DEFAULT 0
    );
    CREATE INDEX work_queue_due ON work_queue (lease_until, id);
    """,
    # A legacy key is the namespace path itself, slash included: without it a file at the root
    # named like a blob key (32 hex digits, an MD5 name for instance) was looked for in the blob
    # area instead of at its path. New keys never equal their path minus the slash.
    """
    UPDATE entries SET blob_key = path WHERE type = 'file' AND blob_key = substr(path, 2);
    """,
)
_MIGRATION_LOCK = 0x43414C4C46  # "CALLF": serialises migrations of nodes starting together
_PLACEHOLDERS = ", ".join(f"${i}" for i in range(1, 14))
_UPSERT = ", ".join(
    f"{c} = excluded.{c}" for c in (*ENTRY_COLUMNS.replace(" ", "").split(","), "parent", "name")
)
_SERIAL_RETRIES = 8
#: First key of the two-key advisory locks that guard paths (the second is the path's hash).
_PATH_LOCKS = 0x43460001
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
    # a connection caught mid-operation by a server shutdown ("cannot switch to state ...;
    # another operation is in progress"): a 500 under load in an audit's fast restarts
    asyncpg.InternalClientError,
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


def _where(dsn: str) -> str:
    """``postgres://user@host:port/db`` without the password or the query (for messages)."""
    from urllib.parse import urlsplit

    try:
        u = urlsplit(dsn)
        host = u.hostname or "localhost"
        port = u.port or 5432
    except ValueError:
        return "the configured metadata_store.dsn"
    user = f"{u.username}@" if u.username else ""
    db = u.path.lstrip("/") or (u.username or "")
    return f"{u.scheme or 'postgres'}://{user}{host}:{port}/{db}"


def _pg_cause(exc: BaseException, timeout: float) -> str:
    """Why PostgreSQL could not be used, in words, with the fix (never only a class name)."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    detail = getattr(exc, "detail", None) if isinstance(exc, asyncpg.PostgresError) else None
    if detail:
        text = f"{text}; {detail}"
    low = text.lower()
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return f"{text} (create it, e.g. createdb, or fix the database name in metadata_store.dsn)"
    if isinstance(exc, asyncpg.InvalidPasswordError):
        return f"{text} (check the password in metadata_store.dsn)"
    if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError):
        return f"{text} (create the role, or fix the user name in metadata_store.dsn)"
    if isinstance(exc, asyncpg.InsufficientPrivilegeError):
        if not low.startswith("permission denied"):
            text = f"permission denied: {text}"
        return f"{text} (grant the role access to the database and schema)"
    if "rejected ssl upgrade" in low or "does not support ssl" in low:
        return (
            "the server does not support SSL (enable SSL on the server, or use sslmode=disable "
            "or sslmode=prefer in metadata_store.dsn)"
        )
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return f"timed out after {timeout:g}s (is the address right and the port reachable?)"
    if isinstance(exc, ConnectionRefusedError) or "connect call failed" in low:
        return "connection refused (is PostgreSQL running and listening there?)"
    if "name or service not known" in low or "nodename nor servname" in low:
        return "host not found"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return text or type(exc).__name__


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
            raise Unavailable(
                f"cannot open the PostgreSQL metadata store at {_where(self._dsn)}: "
                f"{_pg_cause(exc, self._timeout)}"
            ) from exc
        try:
            await self._run(self._migrate)
        except Unavailable as exc:
            await self.close()
            cause = exc.__cause__ or exc
            raise Unavailable(
                f"cannot prepare the PostgreSQL metadata store at {_where(self._dsn)}: "
                f"{_pg_cause(cause, self._timeout)}"
            ) from cause

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
                f"INSERT INTO entries ({ENTRY_COLUMNS}, parent, name) VALUES"
                f" ({_PLACEHOLDERS}) ON CONFLICT (path) DO NOTHING",
                *entry_to_row(ROOT)[:-2],
                "/",
                "",
            )

    async def run(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        """Run ``fn(conn)`` like every store call (for tables beside the namespace: the
        WorkQueue)."""
        return await self._run(fn)

    async def _run(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        """Run ``fn(conn)`` on a pooled connection within the op timeout; map outages."""
        pool = self._pool
        if pool is None:
            raise Unavailable("metadata store is not running")
        conn: Any = None
        answered = False  # the server answered (a result or an error of its own)
        try:
            async with asyncio.timeout(self._timeout):
                conn = await pool.acquire()
                result = await fn(conn)
            answered = True
            return result
        except CallFSError:
            answered = True  # decided on what the server said
            raise
        except _UNAVAILABLE as exc:
            raise Unavailable("metadata store unavailable") from exc
        except asyncpg.UniqueViolationError as exc:
            answered = True
            raise AlreadyExists() from exc
        except asyncpg.PostgresError as exc:
            answered = True
            log.error("postgres error: %s", type(exc).__name__)
            raise Unavailable("metadata store error") from exc
        finally:
            if conn is not None:
                if not answered:
                    # timed out, cancelled (the caller's own bound), the link broken: a graceful
                    # release (cancel, reset) would wait on a frozen server again, doubling the
                    # bound (found by audit); the pool opens a new connection instead
                    conn.terminate()
                await pool.release(conn)

    # ---- entries ---------------------------------------------------------------------------
    async def get(self, path: str) -> Entry | None:
        async def op(conn: Any) -> Entry | None:
            row = await conn.fetchrow(f"SELECT {ENTRY_COLUMNS} FROM entries WHERE path = $1", path)
            return entry_from_row(row) if row else None

        return await self._run(op)

    @staticmethod
    async def _get_many(conn: Any, paths: list[str]) -> dict[str, Entry | None]:
        rows = await conn.fetch(
            f"SELECT {ENTRY_COLUMNS} FROM entries WHERE path = ANY($1::text[])", paths
        )
        found: dict[str, Entry | None] = dict.fromkeys(paths)
        for row in rows:
            found[row[0]] = entry_from_row(row)
        return found

    @staticmethod
    async def _has_children(conn: Any, path: str) -> bool:
        row = await conn.fetchrow(
            "SELECT 1 FROM entries WHERE parent = $1 AND path != '/' LIMIT 1", path
        )
        return row is not None

    @staticmethod
    async def _apply(conn: Any, plan: Plan) -> None:
        if plan.deletes:
            await conn.execute(
                "DELETE FROM entries WHERE path = ANY($1::text[])", [e.path for e in plan.deletes]
            )
        if plan.puts:
            await conn.executemany(
                f"INSERT INTO entries ({ENTRY_COLUMNS}, parent, name) VALUES ({_PLACEHOLDERS})"
                f" ON CONFLICT (path) DO UPDATE SET {_UPSERT}",
                [entry_to_row(e) for e in plan.puts],
            )

    async def _command(
        self,
        fn: Callable[[Any], Awaitable[T]],
        exclusive: Sequence[str],
        shared: Sequence[str] = (),
    ) -> T:
        """One conditional command in one transaction. Before reading, it takes transaction-level
        advisory locks on the paths its decision depends on: exclusive on the paths it changes,
        shared on every ancestor of those, in one global (sorted) order. Any command that
        could change the outcome (a create below a tree being deleted takes the tree's top
        shared, the delete takes it exclusive) therefore waits, and every decision is made on
        rows that cannot change until the commit. A lost create-if-absent race (unique key) is
        decided again."""
        wanted = {p: "x" for p in exclusive}
        for p in shared:
            wanted.setdefault(p, "s")

        async def txn(conn: Any) -> T:
            for attempt in range(_SERIAL_RETRIES):
                try:
                    async with conn.transaction():
                        for path in sorted(wanted):
                            lock = "pg_advisory_xact_lock"
                            if wanted[path] == "s":
                                lock += "_shared"
                            await conn.execute(
                                f"SELECT {lock}($1, hashtext($2))", _PATH_LOCKS, path
                            )
                        return await fn(conn)
                except (asyncpg.DeadlockDetectedError, asyncpg.UniqueViolationError):
                    if attempt == _SERIAL_RETRIES - 1:
                        raise
                    await asyncio.sleep(0.002 * (attempt + 1))
            raise AssertionError("unreachable")

        return await self._run(txn)

    async def create(self, entry: Entry, parents: NewParents | None = None) -> Entry:
        async def op(conn: Any) -> Entry:
            known = await self._get_many(conn, create_reads(entry.path))
            plan, stored = plan_create(entry, parents, known)
            await self._apply(conn, plan)
            return stored

        return await self._command(op, [entry.path], ancestors(entry.path))

    async def update(self, entry: Entry, expected_version: int) -> Entry:
        async def op(conn: Any) -> Entry:
            current = (await self._get_many(conn, [entry.path]))[entry.path]
            plan, stored = plan_update(entry, expected_version, current)
            await self._apply(conn, plan)
            return stored

        return await self._command(op, [entry.path], ancestors(entry.path))

    async def delete(self, path: str, expected_version: int | None = None) -> Entry:
        async def op(conn: Any) -> Entry:
            current = (await self._get_many(conn, [path]))[path]
            busy = current is not None and current.is_dir and await self._has_children(conn, path)
            plan, removed = plan_delete(path, expected_version, current, busy)
            await self._apply(conn, plan)
            return removed

        return await self._command(op, [path], ancestors(path))

    async def delete_tree(
        self, path: str, expected_version: int | None = None, actor: str | None = None
    ) -> list[Entry]:
        async def op(conn: Any) -> list[Entry]:
            top = (await self._get_many(conn, [path]))[path]
            below = await self._descendants(conn, path) if top is not None else []
            plan, removed = plan_delete_tree(path, expected_version, top, below, actor)
            await self._apply(conn, plan)
            return removed

        return await self._command(op, [path], ancestors(path))

    async def move(
        self,
        src: str,
        dst: str,
        *,
        expected_version: int,
        dst_expected: int | None = None,
        parents: NewParents | None = None,
        placement: Placement | None = None,
    ) -> tuple[Entry, Entry | None]:
        async def op(conn: Any) -> tuple[Entry, Entry | None]:
            known = await self._get_many(conn, move_reads(src, dst))
            below = await self._descendants(conn, src) if dst != src else []
            plan, result = plan_move(
                src,
                dst,
                expected_version,
                dst_expected,
                parents,
                placement,
                known,
                below,
                await self._has_children(conn, dst),
            )
            await self._apply(conn, plan)
            return result

        return await self._command(op, [src, dst], [*ancestors(src), *ancestors(dst)])

    async def list_children(self, path: str) -> list[Entry]:
        async def op(conn: Any) -> list[Entry]:
            rows = await conn.fetch(
                f"SELECT {ENTRY_COLUMNS} FROM entries WHERE parent = $1 AND path != '/'"
                " ORDER BY type = 'directory', name",
                path,
            )
            return [entry_from_row(r) for r in rows]

        return await self._run(op)

    async def list_children_page(
        self, path: str, after: ChildPosition | None, limit: int
    ) -> list[Entry]:
        """One range scan of ``entries_children`` (parent, type = 'directory', name) from the
        position on: a row comparison over the index's columns is an index condition (EXPLAIN:
        ``Index Cond: parent = $1 AND ROW(...) > ROW(...)``, ~0.3 ms a page at any depth of a
        1,000,000-entry directory). Not ``(type = 'directory') = $2 AND name > $3``: the planner
        turns ``= false`` into ``type <> 'directory'``, which no longer matches the index."""
        is_dir = after is not None and after[0] is EntryType.DIRECTORY
        start = "" if after is None else after[1]  # "" is below every name

        async def op(conn: Any) -> list[Entry]:
            rows = await conn.fetch(
                f"SELECT {ENTRY_COLUMNS} FROM entries WHERE parent = $1"
                " AND ((type = 'directory'), name) > ($2, $3) AND path != '/'"
                " ORDER BY (type = 'directory'), name LIMIT $4",
                path,
                is_dir,
                start,
                limit,
            )
            return [entry_from_row(r) for r in rows]

        return await self._run(op)

    async def count_children(self, path: str) -> int:
        async def op(conn: Any) -> int:
            n = await conn.fetchval(
                "SELECT count(*) FROM entries WHERE parent = $1 AND path != '/'", path
            )
            return int(n)

        return await self._run(op)

    async def has_children(self, path: str) -> bool:
        return await self._run(lambda conn: self._has_children(conn, path))

    @staticmethod
    async def _descendants(conn: Any, path: str) -> list[Entry]:
        lo, hi = subtree_bounds(path)
        rows = await conn.fetch(
            f"SELECT {ENTRY_COLUMNS} FROM entries WHERE path > $1 AND path < $2", lo, hi
        )
        return [entry_from_row(r) for r in rows]

    async def list_tree(self, path: str, max_depth: int) -> list[Entry]:
        entries = await self._run(lambda conn: self._descendants(conn, path))
        return order_tree(path, entries, max_depth)

    async def blobs_referenced(self, keys: Sequence[str]) -> set[str]:
        wanted = list(keys)

        async def op(conn: Any) -> set[str]:
            rows = await conn.fetch(
                "SELECT blob_key FROM entries WHERE blob_key = ANY($1::text[])", wanted
            )
            return {r[0] for r in rows}

        return await self._run(op)

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
