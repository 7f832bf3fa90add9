"""SQLite metadata store (one node). WAL, ``synchronous=FULL``: an acknowledged write survives a
power cut.

Writes go through ONE writer thread with group commit: whatever writes are queued when the thread
wakes are applied in one transaction, each inside its own SAVEPOINT (so one op's AlreadyExists does
not fail the others), then committed with one fsync. Under concurrency this turns N fsyncs into one.
Reads run on a small pool of reader connections (WAL readers never block the writer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from callfs.errors import (
    AlreadyExists,
    CallFSError,
    InternalError,
    Unavailable,
)
from callfs.metadata.common import (
    ENTRY_COLUMNS,
    ROOT,
    Plan,
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
from callfs.model import Entry, ErasureLayout, Link, LinkStatus, NewParents, Placement

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Ordered schema migrations; ``PRAGMA user_version`` records how many are applied.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE entries (
        path TEXT PRIMARY KEY,
        parent TEXT NOT NULL,
        name TEXT NOT NULL,
        type TEXT NOT NULL,
        size INTEGER NOT NULL,
        owner TEXT NOT NULL,
        mtime INTEGER NOT NULL,
        backend_type TEXT NOT NULL,
        instance_id TEXT,
        version INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        erasure_coded INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID;
    CREATE INDEX entries_children ON entries (parent, type, name);
    CREATE TABLE links (
        token TEXT PRIMARY KEY,
        path TEXT NOT NULL,
        status TEXT NOT NULL,
        expires_at REAL NOT NULL,
        created_at REAL NOT NULL,
        used_at REAL,
        used_by_ip TEXT,
        signature TEXT NOT NULL
    );
    CREATE INDEX links_sweep ON links (status, expires_at);
    CREATE TABLE erasure_layouts (file_path TEXT PRIMARY KEY, layout BLOB NOT NULL);
    """,
    """
    CREATE TABLE replication_queue (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        path TEXT NOT NULL,
        op TEXT NOT NULL,
        queued_at REAL NOT NULL
    );
    """,
    # Placement records name immutable blobs. Files written before this version keep their bytes
    # at the namespace path, which is their (legacy) blob key. The replication queue becomes the
    # WorkQueue (claim with a lease, ack); items queued by an older version are dropped.
    """
    ALTER TABLE entries ADD COLUMN blob_key TEXT;
    UPDATE entries SET blob_key = substr(path, 2) WHERE type = 'file';
    CREATE INDEX entries_blob ON entries (blob_key) WHERE blob_key IS NOT NULL;
    DROP TABLE replication_queue;
    CREATE TABLE work_queue (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,
        key TEXT NOT NULL,
        arg TEXT NOT NULL,
        queued_at REAL NOT NULL,
        lease_owner TEXT,
        lease_until REAL NOT NULL DEFAULT 0,
        attempts INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX work_queue_due ON work_queue (lease_until, id);
    """,
)

_MAX_BATCH = 256
_READERS = 4
_INLINE_BUSY_MS = 20
#: Constraint failures that mean "a row with this key exists" (AlreadyExists, 409).
_KEY_CLASHES = frozenset({"SQLITE_CONSTRAINT_PRIMARYKEY", "SQLITE_CONSTRAINT_UNIQUE"})


def _link(row: Sequence[Any]) -> Link:
    return Link(
        token=row[0],
        path=row[1],
        status=LinkStatus(row[2]),
        expires_at=row[3],
        created_at=row[4],
        used_at=row[5],
        used_by_ip=row[6],
        signature=row[7],
    )


def _connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=10000")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


class _WriteOp:
    __slots__ = ("fn", "future", "loop")

    def __init__(
        self,
        fn: Callable[[sqlite3.Connection], Any],
        future: asyncio.Future[Any],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.fn = fn
        self.future = future
        self.loop = loop


def _op_error(exc: Exception) -> CallFSError:
    """What the caller of one failed write op gets: never a driver exception."""
    if isinstance(exc, CallFSError):
        return exc
    if isinstance(exc, sqlite3.IntegrityError) and exc.sqlite_errorname in _KEY_CLASHES:
        err: CallFSError = AlreadyExists()
    elif isinstance(exc, sqlite3.IntegrityError):
        log.error("sqlite write broke a constraint: %s", exc)
        err = InternalError("metadata store write failed")
    elif isinstance(exc, sqlite3.Error):
        log.error("sqlite write failed: %s", exc)
        err = Unavailable("metadata store write failed")
    else:
        log.error("sqlite write op raised", exc_info=exc)
        err = InternalError("metadata store write failed")
    err.__cause__ = exc
    return err


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the waiter was cancelled (a timeout): nothing to deliver
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class SqliteMetadataStore:
    def __init__(self, path: str) -> None:
        self.path = path
        self._queue: queue.SimpleQueue[_WriteOp | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._readers: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        #: Point reads run inline on the event loop with this connection: a WAL read of one row from
        #: the page cache costs ~20 us, far less than a thread hop (bench/README.md). It never waits
        #: for a lock longer than _INLINE_BUSY_MS; on any error the read goes to a reader thread.
        self._inline: sqlite3.Connection | None = None
        #: False once close() began: later writes fail at once instead of queueing behind the stop.
        self._accepting = True

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        writer_conn, inline = await asyncio.to_thread(self._prepare_blocking)
        self._inline = inline
        self._accepting = True
        self._readers = ThreadPoolExecutor(_READERS, thread_name_prefix="callfs-sqlite-r")
        self._writer = threading.Thread(
            target=self._writer_loop, args=(writer_conn,), name="callfs-sqlite-w", daemon=True
        )
        self._writer.start()

    def _prepare_blocking(self) -> tuple[sqlite3.Connection, sqlite3.Connection]:
        """Create the directory, migrate, ensure the root; return the writer and inline
        connections (opened here so that an unusable file fails start(), not the first write)."""
        parent = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(parent, exist_ok=True)
            conn = _connect(self.path)
        except (OSError, sqlite3.Error) as exc:
            raise Unavailable("metadata store could not be opened") from exc
        try:
            applied = conn.execute("PRAGMA user_version").fetchone()[0]
            for number, ddl in enumerate(MIGRATIONS[applied:], start=applied + 1):
                conn.execute("BEGIN IMMEDIATE")
                for statement in (s.strip() for s in ddl.split(";")):
                    if statement:
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {number}")
                conn.execute("COMMIT")
                log.info("sqlite metadata schema migrated to version %d", number)
            conn.execute(
                f"INSERT OR IGNORE INTO entries ({ENTRY_COLUMNS}, parent, name)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (*entry_to_row(ROOT)[:-2], "/", ""),
            )
            inline = _connect(self.path)
            inline.execute(f"PRAGMA busy_timeout={_INLINE_BUSY_MS}")
        except sqlite3.Error as exc:
            conn.close()
            raise Unavailable("metadata store could not be opened") from exc
        return conn, inline

    async def close(self) -> None:
        self._accepting = False
        if self._writer is not None:
            self._queue.put(None)
            await asyncio.to_thread(self._writer.join, 30)
            self._writer = None
        if self._readers is not None:
            await asyncio.to_thread(self._readers.shutdown, True)
            self._readers = None
        with self._conns_lock:
            conns = [*self._reader_conns, *([self._inline] if self._inline else [])]
            self._reader_conns.clear()
            self._inline = None
        for conn in conns:
            conn.close()

    # ---- plumbing --------------------------------------------------------------------------
    def _writer_loop(self, conn: sqlite3.Connection) -> None:
        try:
            while True:
                first = self._queue.get()
                if first is None:
                    return
                batch = [first]
                while len(batch) < _MAX_BATCH:
                    try:
                        nxt = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is None:
                        self._queue.put(None)  # stop after this batch
                        break
                    batch.append(nxt)
                self._apply_batch(conn, batch)
        finally:
            conn.close()
            self._fail_pending()

    def _fail_pending(self) -> None:
        """Writes queued behind the stop marker (a write racing close()) fail instead of hanging."""
        while True:
            try:
                op = self._queue.get_nowait()
            except queue.Empty:
                return
            if op is not None:
                stopped = Unavailable("metadata store is not running")
                with contextlib.suppress(RuntimeError):  # the caller's loop is already closed
                    op.loop.call_soon_threadsafe(_resolve, op.future, None, stopped)

    @staticmethod
    def _apply_batch(conn: sqlite3.Connection, batch: list[_WriteOp]) -> None:
        outcomes: list[tuple[Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op in batch:
                conn.execute("SAVEPOINT op")
                try:
                    result = op.fn(conn)
                except Exception as exc:
                    # Every op failure goes to its own caller. Undo only this op; the others in the
                    # batch still commit. If the savepoint itself cannot be rolled back, the
                    # connection is broken: the outer handler fails the whole batch.
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    outcomes.append((None, _op_error(exc)))
                    continue
                conn.execute("RELEASE op")
                outcomes.append((result, None))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            log.error("sqlite write batch failed: %s", exc)
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            failure = Unavailable("metadata store write failed")
            outcomes = [(None, failure) for _ in batch]
        for op, (result, error) in zip(batch, outcomes, strict=True):
            with contextlib.suppress(RuntimeError):  # the caller's loop is already closed
                op.loop.call_soon_threadsafe(_resolve, op.future, result, error)

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._writer is None or not self._accepting:
            raise Unavailable("metadata store is not running")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put(_WriteOp(fn, future, loop))
        return await future

    async def run_write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in the writer's group commit (for tables beside the namespace: the
        WorkQueue)."""
        return await self._write(fn)

    async def run_read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._read(fn)

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = _connect(self.path)
            self._local.conn = conn
            with self._conns_lock:
                self._reader_conns.append(conn)
        return conn

    async def _point_read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """One-row reads: inline when possible (see ``_inline``), else on a reader thread."""
        if self._inline is not None:
            try:
                return fn(self._inline)
            except sqlite3.Error:
                log.debug("inline metadata read failed; retrying on a reader thread")
        return await self._read(fn)

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._readers is None:
            raise Unavailable("metadata store is not running")

        def run() -> T:
            try:
                return fn(self._reader())
            except sqlite3.Error as exc:
                raise Unavailable("metadata store read failed") from exc

        return await asyncio.get_running_loop().run_in_executor(self._readers, run)

    # ---- entries ---------------------------------------------------------------------------
    @staticmethod
    def _get(conn: sqlite3.Connection, path: str) -> Entry | None:
        row = conn.execute(
            f"SELECT {ENTRY_COLUMNS} FROM entries WHERE path = ?", (path,)
        ).fetchone()
        return entry_from_row(row) if row else None

    @classmethod
    def _get_many(cls, conn: sqlite3.Connection, paths: list[str]) -> dict[str, Entry | None]:
        return {p: cls._get(conn, p) for p in paths}

    @staticmethod
    def _has_children(conn: sqlite3.Connection, path: str) -> bool:
        row = conn.execute(
            "SELECT 1 FROM entries WHERE parent = ? AND path != '/' LIMIT 1", (path,)
        ).fetchone()
        return row is not None

    @staticmethod
    def _apply(conn: sqlite3.Connection, plan: Plan) -> None:
        """Apply a command's plan inside the writer's transaction (see ``common.Plan``)."""
        if plan.deletes:
            conn.executemany(
                "DELETE FROM entries WHERE path = ?", [(e.path,) for e in plan.deletes]
            )
        if plan.puts:
            conn.executemany(
                f"INSERT OR REPLACE INTO entries ({ENTRY_COLUMNS}, parent, name)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [entry_to_row(e) for e in plan.puts],
            )

    async def get(self, path: str) -> Entry | None:
        return await self._point_read(lambda c: self._get(c, path))

    async def create(self, entry: Entry, parents: NewParents | None = None) -> Entry:
        def op(conn: sqlite3.Connection) -> Entry:
            plan, stored = plan_create(
                entry, parents, self._get_many(conn, create_reads(entry.path))
            )
            self._apply(conn, plan)
            return stored

        return await self._write(op)

    async def update(self, entry: Entry, expected_version: int) -> Entry:
        def op(conn: sqlite3.Connection) -> Entry:
            plan, stored = plan_update(entry, expected_version, self._get(conn, entry.path))
            self._apply(conn, plan)
            return stored

        return await self._write(op)

    async def delete(self, path: str, expected_version: int | None = None) -> Entry:
        def op(conn: sqlite3.Connection) -> Entry:
            current = self._get(conn, path)
            busy = current is not None and current.is_dir and self._has_children(conn, path)
            plan, removed = plan_delete(path, expected_version, current, busy)
            self._apply(conn, plan)
            return removed

        return await self._write(op)

    async def delete_tree(
        self, path: str, expected_version: int | None = None, actor: str | None = None
    ) -> list[Entry]:
        def op(conn: sqlite3.Connection) -> list[Entry]:
            top = self._get(conn, path)
            below = self._descendants(conn, path) if top is not None else []
            plan, removed = plan_delete_tree(path, expected_version, top, below, actor)
            self._apply(conn, plan)
            return removed

        return await self._write(op)

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
        def op(conn: sqlite3.Connection) -> tuple[Entry, Entry | None]:
            known = self._get_many(conn, move_reads(src, dst))
            below = self._descendants(conn, src) if dst != src else []
            plan, result = plan_move(
                src,
                dst,
                expected_version,
                dst_expected,
                parents,
                placement,
                known,
                below,
                self._has_children(conn, dst),
            )
            self._apply(conn, plan)
            return result

        return await self._write(op)

    async def list_children(self, path: str) -> list[Entry]:
        def op(conn: sqlite3.Connection) -> list[Entry]:
            rows = conn.execute(
                f"SELECT {ENTRY_COLUMNS} FROM entries WHERE parent = ? AND path != '/'"
                " ORDER BY type = 'directory', name",
                (path,),
            ).fetchall()
            return [entry_from_row(r) for r in rows]

        return await self._read(op)

    async def has_children(self, path: str) -> bool:
        return await self._read(lambda c: self._has_children(c, path))

    @staticmethod
    def _descendants(conn: sqlite3.Connection, path: str) -> list[Entry]:
        lo, hi = subtree_bounds(path)
        rows = conn.execute(
            f"SELECT {ENTRY_COLUMNS} FROM entries WHERE path > ? AND path < ?", (lo, hi)
        ).fetchall()
        return [entry_from_row(r) for r in rows]

    async def list_tree(self, path: str, max_depth: int) -> list[Entry]:
        entries = await self._read(lambda c: self._descendants(c, path))
        return order_tree(path, entries, max_depth)

    async def blobs_referenced(self, keys: Sequence[str]) -> set[str]:
        wanted = list(keys)

        def op(conn: sqlite3.Connection) -> set[str]:
            found: set[str] = set()
            for i in range(0, len(wanted), 500):
                part = wanted[i : i + 500]
                marks = ",".join("?" * len(part))
                rows = conn.execute(
                    f"SELECT blob_key FROM entries WHERE blob_key IN ({marks})", part
                ).fetchall()
                found.update(r[0] for r in rows)
            return found

        return await self._read(op)

    # ---- links -----------------------------------------------------------------------------
    async def create_link(self, link: Link) -> None:
        def op(conn: sqlite3.Connection) -> None:
            try:
                conn.execute(
                    "INSERT INTO links (token, path, status, expires_at, created_at, used_at,"
                    " used_by_ip, signature) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        link.token,
                        link.path,
                        link.status.value,
                        link.expires_at,
                        link.created_at,
                        link.used_at,
                        link.used_by_ip,
                        link.signature,
                    ),
                )
            except sqlite3.IntegrityError as exc:
                raise AlreadyExists("link exists") from exc

        await self._write(op)

    async def get_link(self, token: str) -> Link | None:
        def op(conn: sqlite3.Connection) -> Link | None:
            row = conn.execute(
                "SELECT token, path, status, expires_at, created_at, used_at, used_by_ip,"
                " signature FROM links WHERE token = ?",
                (token,),
            ).fetchone()
            return _link(row) if row else None

        return await self._point_read(op)

    async def consume_link(self, token: str, used_at: float, used_by_ip: str) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE links SET status = 'used', used_at = ?, used_by_ip = ?"
                " WHERE token = ? AND status = 'active'",
                (used_at, used_by_ip, token),
            )
            return cur.rowcount == 1

        return await self._write(op)

    async def sweep_links(self, now: float, used_before: float) -> int:
        def op(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "DELETE FROM links WHERE (status = 'active' AND expires_at <= ?)"
                " OR (status = 'used' AND used_at < ?)",
                (now, used_before),
            )
            return cur.rowcount

        return await self._write(op)

    # ---- erasure layouts -------------------------------------------------------------------
    async def put_erasure(self, layout: ErasureLayout) -> None:
        blob = pack_layout(layout)

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO erasure_layouts (file_path, layout) VALUES (?, ?)"
                " ON CONFLICT (file_path) DO UPDATE SET layout = excluded.layout",
                (layout.file_path, blob),
            )

        await self._write(op)

    async def get_erasure(self, path: str) -> ErasureLayout | None:
        def op(conn: sqlite3.Connection) -> ErasureLayout | None:
            row = conn.execute(
                "SELECT layout FROM erasure_layouts WHERE file_path = ?", (path,)
            ).fetchone()
            return unpack_layout(row[0]) if row else None

        return await self._read(op)

    async def delete_erasure(self, path: str) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM erasure_layouts WHERE file_path = ?", (path,))

        await self._write(op)
