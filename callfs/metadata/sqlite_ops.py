"""The SQLite schema and every metadata operation as a plain function of a connection.

Two users: the one-node SQLite store (``metadata/sqlite.py``, which runs writes in its group-commit
writer thread) and the Raft state machine (``cluster/fsm.py``, which runs the same commands in
``apply``). One implementation of each command means a Raft cluster decides exactly as a single
node does. Commands are deterministic: every time and id comes in as an argument.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from callfs.errors import AlreadyExists
from callfs.metadata.base import ChildPosition
from callfs.metadata.common import (
    ENTRY_COLUMNS,
    ROOT,
    Plan,
    create_reads,
    entry_from_row,
    entry_to_row,
    move_reads,
    plan_create,
    plan_delete,
    plan_delete_tree,
    plan_move,
    plan_update,
    subtree_bounds,
    unpack_layout,
)
from callfs.model import (
    Entry,
    EntryType,
    ErasureLayout,
    Link,
    LinkStatus,
    NewParents,
    Placement,
    WorkItem,
)

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
    # A legacy key is the namespace path itself, slash included: without it a file at the root
    # named like a blob key (32 hex digits, an MD5 name for instance) was looked for in the blob
    # area instead of at its path. New keys never equal their path minus the slash.
    """
    UPDATE entries SET blob_key = path WHERE type = 'file' AND blob_key = substr(path, 2);
    """,
)


_ENTRY_MARKS = ", ".join("?" * 13)
_LINK_COLUMNS = "token, path, status, expires_at, created_at, used_at, used_by_ip, signature"


def connect(path: str, synchronous: str = "FULL") -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA busy_timeout=10000")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


def migrate(conn: sqlite3.Connection) -> list[int]:
    """Apply the migrations not yet applied and make sure the root exists; return the versions
    applied now."""
    done: list[int] = []
    applied = conn.execute("PRAGMA user_version").fetchone()[0]
    for number, ddl in enumerate(MIGRATIONS[applied:], start=applied + 1):
        conn.execute("BEGIN IMMEDIATE")
        for statement in (s.strip() for s in ddl.split(";")):
            if statement:
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {number}")
        conn.execute("COMMIT")
        done.append(number)
    conn.execute(
        f"INSERT OR IGNORE INTO entries ({ENTRY_COLUMNS}, parent, name) VALUES ({_ENTRY_MARKS})",
        entry_to_row(ROOT),
    )
    return done


def link_from_row(row: Sequence[Any]) -> Link:
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


def link_to_row(link: Link) -> tuple[Any, ...]:
    return (
        link.token,
        link.path,
        link.status.value,
        link.expires_at,
        link.created_at,
        link.used_at,
        link.used_by_ip,
        link.signature,
    )


# ---- reads -----------------------------------------------------------------------------------
def get(conn: sqlite3.Connection, path: str) -> Entry | None:
    row = conn.execute(f"SELECT {ENTRY_COLUMNS} FROM entries WHERE path = ?", (path,)).fetchone()
    return entry_from_row(row) if row else None


def get_many(conn: sqlite3.Connection, paths: list[str]) -> dict[str, Entry | None]:
    return {p: get(conn, p) for p in paths}


def has_children(conn: sqlite3.Connection, path: str) -> bool:
    row = conn.execute(
        "SELECT 1 FROM entries WHERE parent = ? AND path != '/' LIMIT 1", (path,)
    ).fetchone()
    return row is not None


def descendants(conn: sqlite3.Connection, path: str) -> list[Entry]:
    lo, hi = subtree_bounds(path)
    rows = conn.execute(
        f"SELECT {ENTRY_COLUMNS} FROM entries WHERE path > ? AND path < ?", (lo, hi)
    ).fetchall()
    return [entry_from_row(r) for r in rows]


def list_children(conn: sqlite3.Connection, path: str) -> list[Entry]:
    rows = conn.execute(
        f"SELECT {ENTRY_COLUMNS} FROM entries WHERE parent = ? AND path != '/'"
        " ORDER BY type = 'directory', name",
        (path,),
    ).fetchall()
    return [entry_from_row(r) for r in rows]


def list_children_page(
    conn: sqlite3.Connection, path: str, after: ChildPosition | None, limit: int
) -> list[Entry]:
    """Children after ``after`` in listing order: the files past it, then the directories past
    it, each a range scan of the (parent, type, name) index (whose own order puts directories
    first, hence two scans rather than one)."""
    out: list[Entry] = []
    for kind in (EntryType.FILE, EntryType.DIRECTORY):
        if after is not None and kind is EntryType.FILE and after[0] is EntryType.DIRECTORY:
            continue  # the position lies among the directories: every file is before it
        # "" is below every name (and is the root's own name: "/" never lists itself)
        start = after[1] if after is not None and after[0] is kind else ""
        rows = conn.execute(
            f"SELECT {ENTRY_COLUMNS} FROM entries INDEXED BY entries_children"
            " WHERE parent = ? AND type = ? AND name > ? AND path != '/' ORDER BY name LIMIT ?",
            (path, kind.value, start, limit - len(out)),
        ).fetchall()
        out.extend(entry_from_row(r) for r in rows)
        if len(out) >= limit:
            break
    return out


def count_children(conn: sqlite3.Connection, path: str) -> int:
    row = conn.execute(
        "SELECT count(*) FROM entries INDEXED BY entries_children WHERE parent = ? AND path != '/'",
        (path,),
    ).fetchone()
    return int(row[0])


def blobs_referenced(conn: sqlite3.Connection, keys: Sequence[str]) -> set[str]:
    wanted = list(keys)
    found: set[str] = set()
    for i in range(0, len(wanted), 500):
        part = wanted[i : i + 500]
        marks = ",".join("?" * len(part))
        rows = conn.execute(
            f"SELECT blob_key FROM entries WHERE blob_key IN ({marks})", part
        ).fetchall()
        found.update(r[0] for r in rows)
    return found


def get_link(conn: sqlite3.Connection, token: str) -> Link | None:
    row = conn.execute(f"SELECT {_LINK_COLUMNS} FROM links WHERE token = ?", (token,)).fetchone()
    return link_from_row(row) if row else None


def get_erasure(conn: sqlite3.Connection, path: str) -> ErasureLayout | None:
    row = conn.execute("SELECT layout FROM erasure_layouts WHERE file_path = ?", (path,)).fetchone()
    return unpack_layout(row[0]) if row else None


def wq_backlog(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM work_queue").fetchone()[0])


# ---- the conditional commands (inside the caller's transaction) ------------------------------
def apply_plan(conn: sqlite3.Connection, plan: Plan) -> None:
    """Apply a command's plan (see ``common.Plan``)."""
    if plan.deletes:
        conn.executemany("DELETE FROM entries WHERE path = ?", [(e.path,) for e in plan.deletes])
    if plan.puts:
        conn.executemany(
            f"INSERT OR REPLACE INTO entries ({ENTRY_COLUMNS}, parent, name)"
            f" VALUES ({_ENTRY_MARKS})",
            [entry_to_row(e) for e in plan.puts],
        )


def create(conn: sqlite3.Connection, entry: Entry, parents: NewParents | None) -> Entry:
    plan, stored = plan_create(entry, parents, get_many(conn, create_reads(entry.path)))
    apply_plan(conn, plan)
    return stored


def update(conn: sqlite3.Connection, entry: Entry, expected_version: int) -> Entry:
    plan, stored = plan_update(entry, expected_version, get(conn, entry.path))
    apply_plan(conn, plan)
    return stored


def delete(conn: sqlite3.Connection, path: str, expected_version: int | None) -> Entry:
    current = get(conn, path)
    busy = current is not None and current.is_dir and has_children(conn, path)
    plan, removed = plan_delete(path, expected_version, current, busy)
    apply_plan(conn, plan)
    return removed


def delete_tree(
    conn: sqlite3.Connection, path: str, expected_version: int | None, actor: str | None
) -> list[Entry]:
    top = get(conn, path)
    below = descendants(conn, path) if top is not None else []
    plan, removed = plan_delete_tree(path, expected_version, top, below, actor)
    apply_plan(conn, plan)
    return removed


def move(
    conn: sqlite3.Connection,
    src: str,
    dst: str,
    expected_version: int,
    dst_expected: int | None,
    parents: NewParents | None,
    placement: Placement | None,
) -> tuple[Entry, Entry | None]:
    known = get_many(conn, move_reads(src, dst))
    below = descendants(conn, src) if dst != src else []
    plan, result = plan_move(
        src,
        dst,
        expected_version,
        dst_expected,
        parents,
        placement,
        known,
        below,
        has_children(conn, dst),
    )
    apply_plan(conn, plan)
    return result


def create_link(conn: sqlite3.Connection, link: Link) -> None:
    try:
        conn.execute(
            f"INSERT INTO links ({_LINK_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            link_to_row(link),
        )
    except sqlite3.IntegrityError as exc:
        raise AlreadyExists("link exists") from exc


def consume_link(conn: sqlite3.Connection, token: str, used_at: float, used_by_ip: str) -> bool:
    cur = conn.execute(
        "UPDATE links SET status = 'used', used_at = ?, used_by_ip = ?"
        " WHERE token = ? AND status = 'active'",
        (used_at, used_by_ip, token),
    )
    return cur.rowcount == 1


def sweep_links(conn: sqlite3.Connection, now: float, used_before: float) -> int:
    cur = conn.execute(
        "DELETE FROM links WHERE (status = 'active' AND expires_at <= ?)"
        " OR (status = 'used' AND used_at < ?)",
        (now, used_before),
    )
    return cur.rowcount


def put_erasure(conn: sqlite3.Connection, file_path: str, packed: bytes) -> None:
    conn.execute(
        "INSERT INTO erasure_layouts (file_path, layout) VALUES (?, ?)"
        " ON CONFLICT (file_path) DO UPDATE SET layout = excluded.layout",
        (file_path, packed),
    )


def delete_erasure(conn: sqlite3.Connection, path: str) -> None:
    conn.execute("DELETE FROM erasure_layouts WHERE file_path = ?", (path,))


# ---- the work queue (table ``work_queue``) ---------------------------------------------------
def wq_enqueue(conn: sqlite3.Connection, kind: str, key: str, arg: str, now: float) -> None:
    conn.execute(
        "INSERT INTO work_queue (kind, key, arg, queued_at) VALUES (?, ?, ?, ?)",
        (kind, key, arg, now),
    )


def wq_claim(
    conn: sqlite3.Connection, worker: str, limit: int, lease: float, now: float
) -> list[WorkItem]:
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


def wq_due(conn: sqlite3.Connection, now: float) -> bool:
    """Whether ``wq_claim`` at ``now`` would lease anything (a read: no write when idle)."""
    row = conn.execute("SELECT 1 FROM work_queue WHERE lease_until <= ? LIMIT 1", (now,))
    return row.fetchone() is not None


def wq_renew(
    conn: sqlite3.Connection, worker: str, ids: Sequence[int], lease: float, now: float
) -> list[int]:
    """Extend to ``now + lease`` the lease of those ``ids`` still leased to ``worker``; their ids,
    ascending."""
    renewed: list[int] = []
    for i in sorted(set(ids)):
        cur = conn.execute(
            "UPDATE work_queue SET lease_until = ? WHERE id = ? AND lease_owner = ?",
            (now + lease, i, worker),
        )
        if cur.rowcount:
            renewed.append(i)
    return renewed


def wq_ack(conn: sqlite3.Connection, worker: str, ids: Sequence[int]) -> None:
    conn.executemany(
        "DELETE FROM work_queue WHERE id = ? AND lease_owner = ?", [(i, worker) for i in ids]
    )


def wq_retry(conn: sqlite3.Connection, worker: str, ids: Sequence[int], not_before: float) -> None:
    conn.executemany(
        "UPDATE work_queue SET lease_owner = NULL, lease_until = ?"
        " WHERE id = ? AND lease_owner = ?",
        [(not_before, i, worker) for i in ids],
    )
