"""The MetadataStore seam: the namespace, links and erasure layouts.

Every implementation (sqlite, postgres, redis, raft) passes
``callfs/tests/contract/test_metadata.py``. All paths are canonical engine paths. Races are decided
by the store: conditional writes either apply atomically or raise, never half-apply.

Each namespace change is ONE conditional command, decided and applied atomically by the store (the
decisions are shared: ``metadata/common.py``), so races and crashes are decided by the store, never
by a sequence of calls held together with locks.

Errors: ``AlreadyExists``, ``NotFound``, ``VersionConflict`` as documented per method; a store that
cannot be reached raises ``Unavailable`` (never a driver exception).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from callfs.model import Entry, EntryType, ErasureLayout, Link, NewParents, Placement

#: A position in a directory's listing order: (type, name). Files come before directories, so
#: ``(FILE, "z")`` lies before ``(DIRECTORY, "a")``.
ChildPosition = tuple[EntryType, str]


class MetadataStore(Protocol):
    async def start(self) -> None:
        """Connect, run schema migrations, and create the root ``/`` if missing (owner ``root``,
        directory, no instance, backend ``localfs``)."""
        ...

    async def close(self) -> None: ...

    # ---- reads ---------------------------------------------------------------------------
    async def get(self, path: str) -> Entry | None:
        """The entry at ``path`` or None."""
        ...

    async def list_children(self, path: str) -> list[Entry]:
        """Direct children of ``path`` in contract order: files before directories, then names in
        ascending code-point order. Empty list for a missing or childless path."""
        ...

    async def list_children_page(
        self, path: str, after: ChildPosition | None, limit: int
    ) -> list[Entry]:
        """At most ``limit`` (>= 1) direct children of ``path`` that come after the position
        ``after`` (None: from the start) in ``list_children`` order, in that order. The position
        need not name an existing child. An index range read that starts at ``after``, never a scan
        of the children before it: a page costs O(limit), whatever the directory's size. Pages
        are not a snapshot; an entry present throughout a paging appears exactly once."""
        ...

    async def count_children(self, path: str) -> int:
        """How many direct children ``path`` has (0 for a missing path); an index-only count."""
        ...

    async def has_children(self, path: str) -> bool: ...

    async def list_tree(self, path: str, max_depth: int) -> list[Entry]:
        """Recursive listing of ``path`` (§9.10): direct children are depth 0; includes depths
        0..max_depth; order as ``order_tree`` gives. Done in the store, not N round trips."""
        ...

    async def blobs_referenced(self, keys: Sequence[str]) -> set[str]:
        """Which of ``keys`` some entry names as its blob key (the orphan sweep's question)."""
        ...

    # ---- the conditional commands: each decided and applied atomically (common.plan_*) -----
    async def create(self, entry: Entry, parents: NewParents | None = None) -> Entry:
        """Create-if-absent with version 1. With ``parents``, every missing ancestor is created
        as a directory in the same atomic step; without, a missing parent raises ``NotFound``.
        ``AlreadyExists`` if the path exists; ``ParentNotDirectory`` if an ancestor is a file."""
        ...

    async def update(self, entry: Entry, expected_version: int) -> Entry:
        """Replace-if-version: the entry at ``entry.path`` must have ``expected_version`` (and the
        same type); it becomes ``expected_version + 1``. ``NotFound``, ``VersionConflict``."""
        ...

    async def delete(self, path: str, expected_version: int | None = None) -> Entry:
        """Delete-if-version of a file or an EMPTY directory; returns the removed entry.
        ``NotFound``; ``VersionConflict``; ``DirectoryNotEmpty``; the root: ``PermissionDenied``."""
        ...

    async def delete_tree(
        self, path: str, expected_version: int | None = None, actor: str | None = None
    ) -> list[Entry]:
        """Delete ``path`` and its whole subtree (``/`` itself is kept) iff ``actor`` owns every
        entry of it as stored at that moment (``actor`` None: an admin, no check); otherwise
        ``PermissionDenied`` and nothing changes. Returns the removed entries, deepest first."""
        ...

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
        """Move ``src`` and its subtree to ``dst`` (versions bump), optionally switching the
        file's placement (``dst == src``: only that; a directory's placement, blob key None,
        switches only in place: its backend and owner node, nothing below it; else
        ``BadRequest``). ``dst_expected`` None: ``dst`` must be absent (``AlreadyExists``); a
        version: ``dst`` must be that version (``VersionConflict``) and is replaced (type
        mismatch ``AlreadyExists``, non-empty directory ``DirectoryNotEmpty``). Missing
        destination parents: created from ``parents``, else ``ParentMissing``. Returns the moved
        entry and the replaced occupant."""
        ...

    # ---- single-use links ----------------------------------------------------------------
    async def create_link(self, link: Link) -> None:
        """``AlreadyExists`` if the token exists (never overwritten)."""
        ...

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
