"""The MetadataStore seam: the namespace, links and erasure layouts.

Every implementation (sqlite, postgres, redis, raft) passes
``callfs/tests/contract/test_metadata.py``. All paths are canonical engine paths. Races are decided
by the store: conditional writes either apply atomically or raise, never half-apply.

Errors: ``AlreadyExists``, ``NotFound``, ``VersionConflict`` as documented per method; a store that
cannot be reached raises ``Unavailable`` (never a driver exception).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from callfs.model import Entry, EntryType, ErasureLayout, Link, parent_of


class MetadataStore(Protocol):
    async def start(self) -> None:
        """Connect, run schema migrations, and create the root ``/`` if missing (owner ``root``,
        directory, no instance, backend ``localfs``)."""
        ...

    async def close(self) -> None: ...

    # ---- entries -------------------------------------------------------------------------
    async def get(self, path: str) -> Entry | None:
        """The entry at ``path`` or None."""
        ...

    async def create(self, entry: Entry) -> Entry:
        """Insert ``entry`` if nothing exists at its path (create-if-absent), with version 1.

        Raises ``AlreadyExists`` if the path exists. Does not check the parent: the engine creates
        parents first. Returns the stored entry."""
        ...

    async def update(self, entry: Entry, expected_version: int) -> Entry:
        """Replace the entry at ``entry.path`` iff its stored version equals ``expected_version``;
        the stored version becomes ``expected_version + 1``. Raises ``NotFound`` if missing,
        ``VersionConflict`` if the version differs. Returns the stored entry."""
        ...

    async def delete(self, path: str, expected_version: int | None = None) -> None:
        """Delete one entry (children untouched). ``NotFound`` if missing; ``VersionConflict`` if
        ``expected_version`` is given and differs. The root is never deleted
        (``PermissionDenied``)."""
        ...

    async def list_children(self, path: str) -> list[Entry]:
        """Direct children of ``path`` in contract order: files before directories, then names in
        ascending code-point order. Empty list for a missing or childless path."""
        ...

    async def has_children(self, path: str) -> bool: ...

    async def list_tree(self, path: str, max_depth: int) -> list[Entry]:
        """Recursive listing of ``path`` (§9.10): direct children are depth 0; includes depths
        0..max_depth; order as ``order_tree`` gives. Done in the store, not N round trips."""
        ...

    async def delete_tree(self, path: str) -> list[Entry]:
        """Delete every descendant of ``path`` (not ``path`` itself) in one atomic step and return
        them, deepest first."""
        ...

    async def move_tree(self, src: str, dst: str) -> None:
        """Re-key ``src`` and its whole subtree to ``dst`` atomically (one transaction). Every other
        field stays; versions bump. ``NotFound`` if src is missing; ``AlreadyExists`` if dst
        exists."""
        ...

    # ---- single-use links ----------------------------------------------------------------
    async def create_link(self, link: Link) -> None: ...

    async def get_link(self, token: str) -> Link | None: ...

    async def consume_link(self, token: str, used_at: float, used_by_ip: str) -> bool:
        """Atomic compare-and-set ``active`` -> ``used``. True for exactly one caller; False if the
        link is missing or no longer active."""
        ...

    async def sweep_links(self, now: float, used_before: float) -> int:
        """Delete active links with ``expires_at <= now`` and used links with
        ``used_at < used_before``; return how many were deleted."""
        ...

    # ---- erasure layouts -----------------------------------------------------------------
    async def put_erasure(self, layout: ErasureLayout) -> None:
        """Insert or replace the layout for ``layout.file_path``."""
        ...

    async def get_erasure(self, path: str) -> ErasureLayout | None: ...

    async def delete_erasure(self, path: str) -> None:
        """Idempotent."""
        ...

    # ---- HA replication queue (durable; drained by the replication worker) ----------------
    async def enqueue_replication(self, path: str, op: str, queued_at: float) -> None:
        """Append a pending replica change (``op`` is ``put`` or ``delete``)."""
        ...

    async def replication_batch(self, limit: int) -> list[tuple[int, str, str]]:
        """Up to ``limit`` pending changes, oldest first, as ``(id, path, op)``."""
        ...

    async def ack_replication(self, ids: Sequence[int]) -> None:
        """Remove done changes; unknown ids are ignored."""
        ...

    async def replication_backlog(self) -> int: ...


def child_sort_key(entry: Entry) -> tuple[int, bytes]:
    """Contract order within one directory: files first, then by name in code-point order.

    UTF-8 byte order equals code-point order, so stores may sort by the UTF-8 bytes of the name
    (SQLite's BINARY collation, PostgreSQL ``COLLATE "C"``)."""
    return (1 if entry.type is EntryType.DIRECTORY else 0, entry.name.encode("utf-8"))


def depth_below(root: str, path: str) -> int:
    """Depth of ``path`` under ``root``: direct children are 0."""
    rel = path[len(root) :] if root != "/" else path
    return rel.count("/") - 1


def order_tree(root: str, descendants: Sequence[Entry], max_depth: int) -> list[Entry]:
    """Arrange descendants of ``root`` in the §9.10 order, keeping depths 0..max_depth.

    Order: the directory's own children (files first, then names), then for each child directory
    in that order, its subtree listed the same way."""
    by_parent: dict[str, list[Entry]] = {}
    for entry in descendants:
        if depth_below(root, entry.path) <= max_depth:
            by_parent.setdefault(parent_of(entry.path), []).append(entry)
    for children in by_parent.values():
        children.sort(key=child_sort_key)
    out: list[Entry] = list(by_parent.get(root, []))
    # Explicit stack (depth can reach 1000, past Python's recursion limit). Each frame is a
    # directory's children and the index of the next child whose subtree is still to be emitted.
    frames: list[tuple[list[Entry], int]] = [(out[:], 0)]
    while frames:
        children, idx = frames.pop()
        while idx < len(children) and not children[idx].is_dir:
            idx += 1
        if idx >= len(children):
            continue
        frames.append((children, idx + 1))
        sub = by_parent.get(children[idx].path, [])
        out.extend(sub)
        frames.append((sub, 0))
    return out
