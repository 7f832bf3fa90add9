"""The Raft state machine: the metadata as a local SQLite database written only by ``apply``.

rqlite's model (measured in ``docs/raft.md``): the state is not a Python object per entry but one
SQLite file per node, so a node holds a million entries in a few MB of RSS, restarts from its own
snapshot in under a second, and a snapshot is a consistent copy of that file. ``apply`` runs the
very commands of the one-node SQLite store (``metadata/sqlite_ops.py``), so every replica decides
every race exactly as a single node would.

Rules ``apply`` keeps, because one broken command would wedge or fork every replica:
- deterministic: the clock is the proposer's ``now``; no randomness, no I/O but its database;
- idempotent by request id: a result is remembered (``raft_requests``) and a retried command gets
  it back without running again;
- never raises: a refused command returns its error as a result. A database failure (disk full)
  marks the replica broken (it stops serving reads, ``/health`` says why) instead of skipping.

Durability does not come from this database (``synchronous=OFF``): it is rebuilt at every start
from the last snapshot plus the Raft log, which is fsync'd (``cluster/raft.py``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sqlite3
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from callfs.errors import CallFSError, InternalError, NotFound, Unavailable
from callfs.metadata import raft_commands as C
from callfs.metadata import sqlite_ops as ops
from callfs.metadata.sqlite import op_error

log = logging.getLogger(__name__)

#: How long a request id is remembered (seconds of proposer time). A node retries a "maybe
#: applied" command within ``raft.apply_timeout``; ten minutes also absorb clock skew between
#: proposers, and keep the table (which every snapshot carries) small.
REQUEST_MEMORY = 600.0

#: A snapshot: ``SNAPSHOT_MAGIC | sha256(db) | db``, the whole database (version 1).
SNAPSHOT_MAGIC = b"CFSRAFT1"
#: An incremental snapshot (version 2): ``SNAPSHOT_MAGIC2 | len(db) | sha256(db) | db`` followed
#: by delta records ``DELTA_MAGIC | len(body) | sha256(body) | body``, each body
#: ``msgpack([raft data, [log payload, ...]])``: the commands applied since the record before,
#: replayed in order on restore. Snapshotting appends one record (its cost follows the writes, not
#: the size of the namespace); the whole database is copied again only once replaying the records
#: would take longer than that copy (``cluster/raft.py`` ``_Snapshots``).
SNAPSHOT_MAGIC2 = b"CFSRAFT2"
DELTA_MAGIC = b"CFSD"
_HASH_LEN = 32
_LEN = struct.Struct(">Q")
_DELTA_HEAD = struct.Struct(">4sI32s")
_COPY_CHUNK = 1 << 20
#: A database copy is written to ``<snapshot>`` + this, then renamed (never pysyncobj's own
#: ``.tmp``, which it renames over the snapshot whenever one is taken, nor ``.1.tmp``, where it
#: receives one).
COPY_SUFFIX = ".copy.tmp"
#: The command level from which a node reads version-2 snapshots: one is written only once every
#: member has announced it (``cluster_level``), so a node of an earlier build never gets one.
SNAPSHOT2_LEVEL = 2

_RAFT_TABLES = """
CREATE TABLE IF NOT EXISTS raft_requests (
    id TEXT PRIMARY KEY, at REAL NOT NULL, result BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS raft_requests_at ON raft_requests (at);
CREATE TABLE IF NOT EXISTS raft_members (
    node_id TEXT PRIMARY KEY, raft_addr TEXT NOT NULL, api_endpoint TEXT NOT NULL,
    level INTEGER NOT NULL DEFAULT 1
)
"""


def _raft_tables(conn: sqlite3.Connection) -> None:
    conn.executescript(_RAFT_TABLES)
    columns = {row[1] for row in conn.execute("PRAGMA table_info(raft_members)")}
    if "level" not in columns:  # a database from before members announced their level
        conn.execute("ALTER TABLE raft_members ADD COLUMN level INTEGER NOT NULL DEFAULT 1")


class NewerCommand(Exception):
    """A command of a higher level than this build applies (see ``commands.LEVEL``)."""


#: Exit status of a node that met a command it cannot apply (EX_SOFTWARE).
EXIT_NEWER_COMMAND = 70


def _exit_for_upgrade(message: str) -> None:
    """Stop the node: it cannot apply the log as the others do. Kept running, it would go on
    applying later entries on top of a state that lacks one, snapshot that state and, as
    leader, answer from it. The journal is durable; a restart replays the log from the last
    snapshot and stops here again until the node runs a version that knows the command."""
    stop_node(message)


def stop_node(message: str) -> NoReturn:
    """Stop the whole process at once (exit status 70), from any thread: the node's Raft state
    in memory no longer matches its disk, and a restart reads the disk again."""
    log.critical("%s; stopping this node", message)
    logging.shutdown()
    os._exit(EXIT_NEWER_COMMAND)


Handler = Callable[[sqlite3.Connection, list[Any], float], Any]


def _member_put(conn: sqlite3.Connection, a: list[Any], _now: float) -> None:
    """``[node_id, raft_addr, api_endpoint]``: the member counts as level 1 until it announces
    more (``member_level``), also after a re-join."""
    node_id, raft_addr, endpoint = a
    conn.execute(
        "DELETE FROM raft_members WHERE raft_addr = ? AND node_id != ?", (raft_addr, node_id)
    )
    conn.execute(
        "INSERT OR REPLACE INTO raft_members (node_id, raft_addr, api_endpoint) VALUES (?, ?, ?)",
        (node_id, raft_addr, endpoint),
    )


def _member_level(conn: sqlite3.Connection, a: list[Any], _now: float) -> None:
    """``[node_id, level]``: the command level the node applies. A command of its own, so
    builds from before levels (which refuse it as unknown, harmlessly: they keep no levels) still
    apply ``member_put`` like everyone else."""
    node_id, level = a
    if not isinstance(level, int) or isinstance(level, bool) or not 1 <= level < 1 << 31:
        raise ValueError(f"bad member level {level!r}")
    found = conn.execute(
        "UPDATE raft_members SET level = ? WHERE node_id = ?", (level, node_id)
    ).rowcount
    if not found:
        raise NotFound(f"no raft member {node_id!r}")


def cluster_level(conn: sqlite3.Connection) -> int:
    """The lowest level the member table records (1 when it is empty)."""
    row = conn.execute("SELECT min(level) FROM raft_members").fetchone()
    return int(row[0]) if row and row[0] is not None else 1


def _member_remove(conn: sqlite3.Connection, a: list[Any], _now: float) -> None:
    conn.execute("DELETE FROM raft_members WHERE node_id = ?", (a[0],))


#: ``batch``: several whole commands (each with its own request id) in one log entry, the group
#: commit of concurrent requests; each decided alone, in order; the result lists theirs.
BATCH = "batch"

HANDLERS: dict[str, Handler] = {
    "create": lambda c, a, _: C.entry_out(ops.create(c, C.some_entry_in(a[0]), C.parents_in(a[1]))),
    "update": lambda c, a, _: C.entry_out(ops.update(c, C.some_entry_in(a[0]), a[1])),
    "delete": lambda c, a, _: C.entry_out(ops.delete(c, a[0], a[1])),
    "delete_tree": lambda c, a, _: [C.entry_out(e) for e in ops.delete_tree(c, a[0], a[1], a[2])],
    "move": lambda c, a, _: [
        C.entry_out(e)
        for e in ops.move(c, a[0], a[1], a[2], a[3], C.parents_in(a[4]), C.placement_in(a[5]))
    ],
    "create_link": lambda c, a, _: ops.create_link(c, C.link_in(a[0])),
    "consume_link": lambda c, a, _: ops.consume_link(c, a[0], a[1], a[2]),
    "sweep_links": lambda c, a, _: ops.sweep_links(c, a[0], a[1]),
    "put_erasure": lambda c, a, _: ops.put_erasure(c, a[0], a[1]),
    "delete_erasure": lambda c, a, _: ops.delete_erasure(c, a[0]),
    "wq_enqueue": lambda c, a, _: ops.wq_enqueue(c, a[0], a[1], a[2], a[3]),
    "wq_claim": lambda c, a, _: [
        [w.id, w.kind, w.key, w.arg, w.attempts] for w in ops.wq_claim(c, a[0], a[1], a[2], a[3])
    ],
    "wq_renew": lambda c, a, _: ops.wq_renew(c, a[0], a[1], a[2], a[3]),
    "wq_ack": lambda c, a, _: ops.wq_ack(c, a[0], a[1]),
    "wq_retry": lambda c, a, _: ops.wq_retry(c, a[0], a[1], a[2]),
    "member_put": _member_put,
    "member_level": _member_level,
    "member_remove": _member_remove,
    "noop": lambda c, a, _: None,
}


@dataclass(frozen=True, slots=True)
class Restored:
    """What ``StateMachine.restore`` installed."""

    #: pysyncobj's data of the last record (or of the database itself when there is none).
    raft_data: bytes
    version: int
    #: Where the next delta record goes (version 2): the end of the last intact one.
    end: int
    #: Seconds copying the database took, and replaying the records.
    copy_seconds: float
    replay_seconds: float
    records: int


def remove_db(path: str) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path + suffix)


class StateMachine:
    """Owns the live database at ``path``. ``apply`` and the snapshot hooks run on the Raft tick
    thread; readers open their own connections (WAL: they see only committed commands)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        #: Set when a command could not be applied for a reason other than its own refusal: this
        #: replica no longer matches the others and must not serve reads.
        self.broken: str | None = None
        self.applied = 0
        #: The log payloads applied since the last snapshot point, each with the seconds its
        #: ``apply`` took: the delta of the next incremental snapshot (tick thread only).
        self.since: list[tuple[bytes, float]] = []
        #: Bumped when the member table changes (readers cache it per version).
        self.members_version = 0
        #: Called (tick thread) with the reason when the log holds a command above this build's
        #: level that the group accepted: the node must stop (tests record instead).
        self.on_newer_command: Callable[[str], None] = _exit_for_upgrade

    # ---- lifecycle -------------------------------------------------------------------------
    def open_fresh(self) -> None:
        """Start from an empty database: Raft replays the snapshot and the log into it (a live
        database ahead of the snapshot would apply commands twice)."""
        self.close()
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        remove_db(self.path)
        self.since = []
        self._open()

    def _open(self) -> None:
        conn = ops.connect(self.path, synchronous="OFF")
        ops.migrate(conn)
        _raft_tables(conn)
        self._conn = conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # ---- apply -----------------------------------------------------------------------------
    def apply(self, payload: bytes) -> bytes:
        """Apply one log entry (a command or a batch of them); return its encoded result.
        Never raises."""
        conn = self._conn
        if conn is None:
            return C.failed(InternalError("state machine is closed"))
        started = time.perf_counter()
        try:
            conn.execute("BEGIN IMMEDIATE")
            out = self._run(conn, payload, 0)
            conn.execute("COMMIT")
            self.applied += 1
            if self.broken is None:  # a broken replica takes no snapshot
                self.since.append((payload, time.perf_counter() - started))
            return out
        except NewerCommand as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            self.broken = str(exc)
            self.on_newer_command(str(exc))
            return C.failed(InternalError("metadata replica failed"))
        except Exception as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            if self.broken is None:
                self.broken = f"a command could not be applied: {exc}"
                log.critical("raft state machine broken: %s; this replica stops serving", exc)
            return C.failed(InternalError("metadata replica failed"))

    def _run(self, conn: sqlite3.Connection, payload: bytes, depth: int) -> bytes:
        """One command inside the entry's transaction. A refusal is a result (its savepoint
        rolled back); only a database failure raises (the caller marks the replica broken)."""
        try:
            level, request_id, now, name, args = C.unpack(payload)
            newer = isinstance(level, int) and level > C.LEVEL  # its name may be unknown here
            if not newer and name != BATCH:
                handler = HANDLERS[name]
            elif not newer and (depth > 1 or not all(isinstance(p, bytes) for p in args)):
                raise ValueError("bad batch")
        except Exception:  # a command no version can read: refused, the same everywhere
            return C.failed(InternalError("unreadable raft command"))
        if isinstance(level, int) and level > 1 and level > cluster_level(conn):
            # Decided from the replicated member table, so every replica that knows levels
            # refuses it alike (a proposer checks first; this covers a stale proposer's view).
            return C.failed(
                Unavailable(f"command {name!r} waits for every raft node to apply level {level}")
            )
        if newer:  # the group accepted it: answering anything here would make this replica drift
            raise NewerCommand(
                f"command {name!r} needs command level {level}, this node applies {C.LEVEL}:"
                " upgrade it"
            )
        if request_id:
            row = conn.execute(
                "SELECT result FROM raft_requests WHERE id = ?", (request_id,)
            ).fetchone()
            if row is not None:
                return bytes(row[0])  # a retry of a command already applied: its first answer
        if name == BATCH:
            out = C.ok([self._run(conn, item, depth + 1) for item in args])
        else:
            conn.execute("SAVEPOINT cmd")
            try:
                out = C.ok(handler(conn, args, now))
                if name.startswith("member_"):
                    self.members_version += 1
            except sqlite3.OperationalError:
                raise  # the database itself failed: not a decision
            except Exception as exc:
                conn.execute("ROLLBACK TO cmd")
                out = C.failed(exc if isinstance(exc, CallFSError) else op_error(exc))
            conn.execute("RELEASE cmd")
        if request_id:
            conn.execute(
                "INSERT INTO raft_requests (id, at, result) VALUES (?, ?, ?)",
                (request_id, now, out),
            )
            conn.execute("DELETE FROM raft_requests WHERE at < ?", (now - REQUEST_MEMORY,))
        return out

    # ---- snapshots: ``MAGIC | sha256(db) | db`` ---------------------------------------------
    def pin(self) -> sqlite3.Connection:
        """A reader connection holding a read transaction: what a snapshot copies is exactly the
        state at this moment, while ``apply`` goes on (WAL)."""
        rconn = sqlite3.connect(self.path, check_same_thread=False)
        rconn.execute("BEGIN")
        rconn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return rconn

    def level(self, voters: Sequence[str] | None = None) -> int:
        """The lowest command level of the group (tick thread): of every voter in ``voters``
        (Raft addresses; one with no member row yet, just joined, counts as 1), or of the member
        table's rows without it."""
        if self._conn is None:
            return 1
        if voters is None:
            return cluster_level(self._conn)
        rows = dict(self._conn.execute("SELECT raft_addr, level FROM raft_members").fetchall())
        return min((int(rows.get(addr, 1)) for addr in voters), default=1)

    @staticmethod
    def copy_snapshot(rconn: sqlite3.Connection, raft_data: bytes, out: str, version: int) -> int:
        """Copy the pinned state plus ``raft_data`` to ``out`` (fsync'd; removed if the copy
        fails), in any thread, as a snapshot of ``version`` 1 or 2 (which delta records may
        follow); the size of the file."""
        work = out + ".db"
        remove_db(work)
        try:
            return StateMachine._copy(rconn, raft_data, work, out, version)
        except BaseException:
            remove_db(work)
            with contextlib.suppress(OSError):
                os.remove(out)
            raise

    @staticmethod
    def _copy(
        rconn: sqlite3.Connection, raft_data: bytes, work: str, out: str, version: int
    ) -> int:
        try:
            dst = sqlite3.connect(work)
            try:
                dst.execute("PRAGMA synchronous=OFF")  # a scratch copy: ``out`` is what is fsync'd
                rconn.backup(dst)
                dst.execute("PRAGMA journal_mode=DELETE")
                dst.execute("CREATE TABLE _raftsnap (id INTEGER PRIMARY KEY, data BLOB)")
                dst.execute("INSERT INTO _raftsnap VALUES (1, ?)", (raft_data,))
                dst.commit()
            finally:
                dst.close()
        finally:
            with contextlib.suppress(sqlite3.Error):
                rconn.rollback()
            rconn.close()
        # one pass: the database goes out behind a placeholder header while it is hashed, then
        # the header is written in place
        digest = hashlib.sha256()
        with open(work, "rb") as src, open(out, "wb") as dst_file:
            size = os.fstat(src.fileno()).st_size
            head = SNAPSHOT_MAGIC if version == 1 else SNAPSHOT_MAGIC2 + _LEN.pack(size)
            dst_file.write(head + bytes(_HASH_LEN))
            for chunk in iter(lambda: src.read(_COPY_CHUNK), b""):
                digest.update(chunk)
                dst_file.write(chunk)
            dst_file.seek(0)
            dst_file.write(head + digest.digest())
            dst_file.flush()
            os.fsync(dst_file.fileno())
            total = len(head) + _HASH_LEN + size
        remove_db(work)
        return total

    @staticmethod
    def append_delta(fd: int, offset: int, raft_data: bytes, payloads: Sequence[bytes]) -> int:
        """Write one delta record at ``offset`` of the version-2 snapshot open as ``fd`` (what
        lies beyond, a record torn by a crash, is cut first), fsync'd; the new end."""
        body = C.pack([offset, raft_data, list(payloads)])
        record = _DELTA_HEAD.pack(DELTA_MAGIC, len(body), hashlib.sha256(body).digest()) + body
        os.ftruncate(fd, offset)
        view = memoryview(record)
        pos = 0
        while pos < len(record):
            pos += os.pwrite(fd, view[pos:], offset + pos)
        os.fsync(fd)
        return offset + len(record)

    def restore(self, snapshot: str) -> Restored:
        """Rebuild the live database from a snapshot file (its database, then its delta
        records replayed in order, up to the first torn or damaged one); return what it held. A
        snapshot whose database fails its checksum raises (never half-loaded)."""
        started = time.perf_counter()
        work = self.path + ".restore"
        remove_db(work)
        try:
            with open(work, "wb") as out:
                version, base_end = read_snapshot_base(snapshot, out.write)
        except ValueError:
            remove_db(work)
            raise
        src = sqlite3.connect(work)
        try:
            row = src.execute("SELECT data FROM _raftsnap WHERE id = 1").fetchone()
            src.execute("DROP TABLE _raftsnap")
            src.commit()
            # Copied INTO the live database (not a file swap): every reader connection of the
            # node keeps working and sees the installed state.
            if self._conn is None:
                self._open()
            assert self._conn is not None
            src.backup(self._conn)
        finally:
            src.close()
            remove_db(work)
        assert self._conn is not None
        _raft_tables(self._conn)
        # the copy went through the WAL: fold it back so the node does not hold it twice on disk
        self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        copied = time.perf_counter()
        raft_data, end, records = bytes(row[0]), base_end, 0
        if version == 2:
            raft_data, end, records = self._replay(snapshot, base_end, raft_data)
        self.members_version += 1
        self.broken = None
        self.since = []
        return Restored(
            raft_data,
            version,
            end,
            copied - started,
            time.perf_counter() - copied,
            records,
        )

    def _replay(self, snapshot: str, pos: int, raft_data: bytes) -> tuple[bytes, int, int]:
        """Apply the delta records of ``snapshot`` from ``pos``, each in one transaction, up to
        the first torn or damaged one (a crash while appending it: its snapshot never counted);
        the last record's Raft data, where the intact records end, and how many there were."""
        conn = self._conn
        assert conn is not None
        records = 0
        with open(snapshot, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            f.seek(pos)
            while True:
                head = f.read(_DELTA_HEAD.size)
                if len(head) < _DELTA_HEAD.size:
                    break
                magic, size, want = _DELTA_HEAD.unpack(head)
                body = f.read(size) if magic == DELTA_MAGIC else b""
                if magic != DELTA_MAGIC or len(body) < size:
                    break  # torn: the last record, cut by a crash while it was written
                if hashlib.sha256(body).digest() != want:
                    if pos + len(head) + size < file_size:
                        # records are cut before one is appended, so only the last can be torn
                        raise ValueError(f"{snapshot}: delta record at {pos} is damaged")
                    break
                at, data, payloads = C.unpack(body)
                if at != pos:  # a record from elsewhere in the file: a transfer lost bytes
                    raise ValueError(f"{snapshot}: delta record at {pos} says it was at {at}")
                conn.execute("BEGIN IMMEDIATE")
                try:
                    for payload in payloads:
                        self._run(conn, payload, 0)
                    conn.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                    raise
                raft_data = data
                pos += len(head) + size
                records += 1
        return raft_data, pos, records


def publish(out: str, final: str) -> None:
    """Put the fsync'd file ``out`` in place as ``final``, durably."""
    os.replace(out, final)
    fsync_dir(final)


def read_snapshot_base(snapshot: str, sink: Callable[[bytes], object]) -> tuple[int, int]:
    """Pass a snapshot's database to ``sink`` and check it against its SHA-256: ``(format
    version, offset where its delta records begin)``. ValueError if it is not a snapshot of
    ours, is cut short, or fails the checksum (``sink`` may have had some of it by then)."""
    with open(snapshot, "rb") as f:
        magic = f.read(len(SNAPSHOT_MAGIC))
        if magic == SNAPSHOT_MAGIC:
            version, left = 1, -1
        elif magic == SNAPSHOT_MAGIC2:
            version, left = 2, _LEN.unpack(f.read(_LEN.size).rjust(_LEN.size, b"\0"))[0]
        else:
            raise ValueError(f"{snapshot} is not a CallFS raft snapshot")
        want = f.read(_HASH_LEN)
        digest = hashlib.sha256()
        while left:
            chunk = f.read(_COPY_CHUNK if left < 0 else min(_COPY_CHUNK, left))
            if not chunk:
                break
            digest.update(chunk)
            sink(chunk)
            if left > 0:
                left -= len(chunk)
        base_end = f.tell()
    if len(want) != _HASH_LEN or digest.digest() != want or left > 0:
        raise ValueError(f"{snapshot} failed its checksum (incomplete transfer?)")
    return version, base_end


def fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
