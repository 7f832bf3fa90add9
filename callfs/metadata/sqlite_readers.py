"""Reads of a SQLite database off the event loop: a few reader threads, each with its own
connection (WAL readers never block the writer), and one connection for point reads run inline
(a one-row read from the page cache costs ~20 us, far less than a thread hop; bench/README.md).
Used by the one-node SQLite store and by the Raft replica's local reads."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from callfs.errors import Unavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

_READERS = 4
#: An inline read never waits for a lock longer than this; then it goes to a reader thread.
_INLINE_BUSY_MS = 20


class SqliteReaders:
    def __init__(self, connect: Callable[[], sqlite3.Connection], name: str) -> None:
        self._connect = connect
        self._name = name
        self._pool: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        #: The connection point reads use on the event loop (None: not running).
        self.inline: sqlite3.Connection | None = None

    def start(self, inline: sqlite3.Connection | None = None) -> None:
        """``inline``: an already opened connection (so an unusable file fails at start)."""
        conn = inline if inline is not None else self._connect()
        conn.execute(f"PRAGMA busy_timeout={_INLINE_BUSY_MS}")
        self.inline = conn
        self._pool = ThreadPoolExecutor(_READERS, thread_name_prefix=self._name)

    async def close(self) -> None:
        if self._pool is not None:
            await asyncio.to_thread(self._pool.shutdown, True)
            self._pool = None
        with self._lock:
            conns = [*self._conns, *([self.inline] if self.inline else [])]
            self._conns.clear()
            self.inline = None
        for conn in conns:
            conn.close()

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            with self._lock:
                self._conns.append(conn)
        return conn

    async def point(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """A one-row read: inline when possible, else on a reader thread."""
        if self.inline is not None:
            try:
                return fn(self.inline)
            except sqlite3.Error:
                log.debug("inline read failed; retrying on a reader thread")
        return await self.run(fn)

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        pool = self._pool
        if pool is None:
            raise Unavailable("metadata store is not running")

        def call() -> T:
            try:
                return fn(self._reader())
            except sqlite3.Error as exc:
                raise Unavailable("metadata store read failed") from exc

        return await asyncio.get_running_loop().run_in_executor(pool, call)
