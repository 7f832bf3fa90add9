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
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from callfs.errors import (
    AlreadyExists,
    CallFSError,
    InternalError,
    Unavailable,
)
from callfs.metadata import sqlite_ops as ops
from callfs.metadata.base import ChildPosition
from callfs.metadata.common import order_tree, pack_layout
from callfs.metadata.sqlite_readers import SqliteReaders
from callfs.model import Entry, ErasureLayout, Link, NewParents, Placement

log = logging.getLogger(__name__)
T = TypeVar("T")

_MAX_BATCH = 256
#: How long a write batch waits for another process's write transaction (``server.workers``, a
#: CLI beside the server) before it fails: what ``busy_timeout`` was.
_BUSY_LIMIT = 10.0
#: The waits between two tries, growing to the last. SQLite's own busy handler sleeps 25-100 ms
#: once it has waited a few times: two processes writing in turn then saw PUTs wait 700 ms.
_BUSY_SLEEPS = (0.0002, 0.0005, 0.001, 0.002)
_SQLITE_BUSY = 5
#: Constraint failures that mean "a row with this key exists" (AlreadyExists, 409).
_KEY_CLASHES = frozenset({"SQLITE_CONSTRAINT_PRIMARYKEY", "SQLITE_CONSTRAINT_UNIQUE"})


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


def op_error(exc: Exception) -> CallFSError:
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


def _until_not_busy(conn: sqlite3.Connection, sql: str, deadline: float) -> None:
    """Run ``sql`` on the writer connection (``busy_timeout`` 0), trying again after a short
    sleep while another connection holds the write lock, until ``deadline``."""
    tries = 0
    while True:
        try:
            conn.execute(sql)
            return
        except sqlite3.OperationalError as exc:
            busy = exc.sqlite_errorcode & 0xFF == _SQLITE_BUSY  # BUSY_RECOVERY, _SNAPSHOT too
            if not busy or time.monotonic() >= deadline:
                raise
        time.sleep(_BUSY_SLEEPS[min(tries, len(_BUSY_SLEEPS) - 1)])
        tries += 1


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
        self._readers = SqliteReaders(lambda: ops.connect(self.path), "callfs-sqlite-r")
        #: False once close() began: later writes fail at once instead of queueing behind the stop.
        self._accepting = True

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        writer_conn, inline = await asyncio.to_thread(self._prepare_blocking)
        self._readers.start(inline)
        self._accepting = True
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
            conn = ops.connect(self.path)
        except (OSError, sqlite3.Error) as exc:
            raise self._open_error(exc) from exc
        try:
            for number in ops.migrate(conn):
                log.info("sqlite metadata schema migrated to version %d", number)
            conn.execute("PRAGMA busy_timeout=0")  # the writer waits in _until_not_busy
            inline = ops.connect(self.path)
        except sqlite3.Error as exc:
            conn.close()
            raise self._open_error(exc) from exc
        return conn, inline

    def _open_error(self, exc: Exception) -> Unavailable:
        """Say which file and why (permission denied, not a database, read-only disk...)."""
        cause = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return Unavailable(
            f"cannot open the SQLite metadata store at {os.path.abspath(self.path)}: {cause}"
            " (check metadata_store.sqlite_path and the directory's permissions)"
        )

    async def close(self) -> None:
        self._accepting = False
        if self._writer is not None:
            self._queue.put(None)
            await asyncio.to_thread(self._writer.join, 30)
            self._writer = None
        await self._readers.close()

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
            deadline = time.monotonic() + _BUSY_LIMIT
            _until_not_busy(conn, "BEGIN IMMEDIATE", deadline)
            for op in batch:
                if op.future.cancelled():
                    # Its caller gave up (the store timed out for it, or the request ended)
                    # before it ran: it is not run at all, so that "timed out" means "not
                    # applied" whenever the command had not started. (Read from this thread:
                    # a cancel landing just after the check leaves the op applied, the
                    # ambiguous outcome every caller of a timed-out command already allows.)
                    outcomes.append((None, None))
                    continue
                conn.execute("SAVEPOINT op")
                try:
                    result = op.fn(conn)
                except Exception as exc:
                    # Every op failure goes to its own caller. Undo only this op; the others in the
                    # batch still commit. If the savepoint itself cannot be rolled back, the
                    # connection is broken: the outer handler fails the whole batch.
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    outcomes.append((None, op_error(exc)))
                    continue
                conn.execute("RELEASE op")
                outcomes.append((result, None))
            _until_not_busy(conn, "COMMIT", deadline)  # a busy COMMIT stays open: tried again
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

    async def _point_read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._readers.point(fn)

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._readers.run(fn)

    # ---- entries ---------------------------------------------------------------------------
    async def get(self, path: str) -> Entry | None:
        return await self._point_read(lambda c: ops.get(c, path))

    async def create(self, entry: Entry, parents: NewParents | None = None) -> Entry:
        return await self._write(lambda c: ops.create(c, entry, parents))

    async def update(self, entry: Entry, expected_version: int) -> Entry:
        return await self._write(lambda c: ops.update(c, entry, expected_version))

    async def delete(self, path: str, expected_version: int | None = None) -> Entry:
        return await self._write(lambda c: ops.delete(c, path, expected_version))

    async def delete_tree(
        self, path: str, expected_version: int | None = None, actor: str | None = None
    ) -> list[Entry]:
        return await self._write(lambda c: ops.delete_tree(c, path, expected_version, actor))

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
        return await self._write(
            lambda c: ops.move(c, src, dst, expected_version, dst_expected, parents, placement)
        )

    async def list_children(self, path: str) -> list[Entry]:
        return await self._read(lambda c: ops.list_children(c, path))

    async def list_children_page(
        self, path: str, after: ChildPosition | None, limit: int
    ) -> list[Entry]:
        return await self._read(lambda c: ops.list_children_page(c, path, after, limit))

    async def count_children(self, path: str) -> int:
        return await self._read(lambda c: ops.count_children(c, path))

    async def has_children(self, path: str) -> bool:
        return await self._read(lambda c: ops.has_children(c, path))

    async def list_tree(self, path: str, max_depth: int) -> list[Entry]:
        entries = await self._read(lambda c: ops.descendants(c, path))
        return order_tree(path, entries, max_depth)

    async def blobs_referenced(self, keys: Sequence[str]) -> set[str]:
        return await self._read(lambda c: ops.blobs_referenced(c, keys))

    # ---- links -----------------------------------------------------------------------------
    async def create_link(self, link: Link) -> None:
        await self._write(lambda c: ops.create_link(c, link))

    async def get_link(self, token: str) -> Link | None:
        return await self._point_read(lambda c: ops.get_link(c, token))

    async def consume_link(self, token: str, used_at: float, used_by_ip: str) -> bool:
        return await self._write(lambda c: ops.consume_link(c, token, used_at, used_by_ip))

    async def sweep_links(self, now: float, used_before: float) -> int:
        return await self._write(lambda c: ops.sweep_links(c, now, used_before))

    # ---- erasure layouts -------------------------------------------------------------------
    async def put_erasure(self, layout: ErasureLayout) -> None:
        packed = pack_layout(layout)
        await self._write(lambda c: ops.put_erasure(c, layout.file_path, packed))

    async def get_erasure(self, path: str) -> ErasureLayout | None:
        return await self._read(lambda c: ops.get_erasure(c, path))

    async def delete_erasure(self, path: str) -> None:
        await self._write(lambda c: ops.delete_erasure(c, path))
