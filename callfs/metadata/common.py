"""What every metadata store shares: row codecs, subtree bounds, ordering, and the DECISION of
each conditional command.

Every namespace change is one conditional command. Its decision is a pure function here
(``plan_*``): given the rows the command depends on, read inside the store's own atomic unit
(an SQLite write transaction, a serializable PostgreSQL transaction, a WATCHed Redis MULTI, one
Raft apply), it either raises the domain error or returns a ``Plan``: the rows to delete, then the
rows to write. A store applies the plan in that same atomic unit, so a command is decided and
applied as one step, never as a sequence held together by locks. Stores never import each other.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import msgpack

from callfs.errors import (
    AlreadyExists,
    BadRequest,
    DirectoryNotEmpty,
    NotFound,
    ParentMissing,
    ParentNotDirectory,
    PermissionDenied,
    VersionConflict,
)
from callfs.model import (
    ROOT_OWNER,
    BackendType,
    Entry,
    EntryType,
    ErasureLayout,
    NewParents,
    Placement,
    ShardInfo,
    parent_of,
)

#: Column order of an entry row (SQLite and PostgreSQL); ``entry_from_row`` reads it back.
ENTRY_COLUMNS = (
    "path, type, size, owner, mtime, backend_type, instance_id, version, created_at,"
    " erasure_coded, blob_key"
)

ROOT = Entry(
    path="/",
    type=EntryType.DIRECTORY,
    size=0,
    owner=ROOT_OWNER,
    mtime=0,
    backend_type=BackendType.LOCALFS,
    instance_id=None,
)


def entry_from_row(row: Sequence[Any]) -> Entry:
    return Entry(
        path=row[0],
        type=EntryType(row[1]),
        size=row[2],
        owner=row[3],
        mtime=row[4],
        backend_type=BackendType(row[5]),
        instance_id=row[6],
        version=row[7],
        created_at=row[8],
        erasure_coded=bool(row[9]),
        blob_key=row[10],
    )


def entry_to_row(e: Entry) -> tuple[Any, ...]:
    """Values in ``ENTRY_COLUMNS`` order, then ``parent`` and ``name``."""
    return (
        e.path,
        e.type.value,
        e.size,
        e.owner,
        e.mtime,
        e.backend_type.value,
        e.instance_id,
        e.version,
        e.created_at,
        e.erasure_coded,
        e.blob_key,
        e.parent,
        e.name,
    )


def subtree_bounds(path: str) -> tuple[str, str]:
    """Keys strictly inside the subtree of ``path`` lie in ``(lo, hi)`` (``/`` 0x2F, ``0`` 0x30)."""
    if path == "/":
        return "/", "0"
    return path + "/", path + "0"


def ancestors(path: str) -> list[str]:
    """Every ancestor of ``path``, nearest first, ``/`` last (empty for ``/``)."""
    out: list[str] = []
    cursor = path
    while cursor != "/":
        cursor = parent_of(cursor)
        out.append(cursor)
    return out


def deepest_first(entries: Iterable[Entry]) -> list[Entry]:
    return sorted(entries, key=lambda e: e.path.count("/"), reverse=True)


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


# ---- the conditional commands' decisions ---------------------------------------------------
@dataclass(frozen=True, slots=True)
class Plan:
    """Rows a command changes: remove ``deletes`` (by path), then write ``puts`` (insert or
    overwrite by path)."""

    deletes: tuple[Entry, ...] = ()
    puts: tuple[Entry, ...] = ()


def create_reads(path: str) -> list[str]:
    """Paths ``plan_create`` needs: the target and every ancestor."""
    return [path, *ancestors(path)]


def _missing_parents(
    path: str,
    known: Mapping[str, Entry | None],
    parents: NewParents | None,
    missing_error: Exception,
) -> list[Entry]:
    """Directories to create so that ``path``'s parent exists (outermost first)."""
    missing: list[str] = []
    for anc in ancestors(path):
        found = known.get(anc)
        if anc == "/" and found is None:
            break  # the root always exists (a store that lost it recreates it at start)
        if found is None:
            missing.append(anc)
            continue
        if not found.is_dir:
            raise ParentNotDirectory()
        break
    if not missing:
        return []
    if parents is None:
        raise missing_error
    return [
        Entry(
            path=anc,
            type=EntryType.DIRECTORY,
            size=0,
            owner=parents.owner,
            mtime=parents.mtime,
            backend_type=parents.backend_type,
            instance_id=parents.instance_id,
            created_at=parents.mtime,
        )
        for anc in reversed(missing)
    ]


def plan_create(
    entry: Entry, parents: NewParents | None, known: Mapping[str, Entry | None]
) -> tuple[Plan, Entry]:
    """Create-if-absent, with the missing parents when ``parents`` is given.

    ``known`` holds ``create_reads(entry.path)`` (None where nothing is stored)."""
    if entry.path == "/" or known.get(entry.path) is not None:
        raise AlreadyExists()
    made = _missing_parents(
        entry.path, known, parents, NotFound("the parent directory does not exist")
    )
    stored = replace(entry, version=1)
    return Plan(puts=(*made, stored)), stored


def plan_update(entry: Entry, expected_version: int, current: Entry | None) -> tuple[Plan, Entry]:
    """Replace-if-version: the stored version must be ``expected_version``; it becomes +1."""
    if current is None:
        raise NotFound()
    if current.version != expected_version or current.type is not entry.type:
        raise VersionConflict()
    stored = replace(entry, version=expected_version + 1)
    return Plan(deletes=(current,), puts=(stored,)), stored


def plan_delete(
    path: str, expected_version: int | None, current: Entry | None, has_children: bool
) -> tuple[Plan, Entry]:
    """Delete-if-version of one file or one EMPTY directory."""
    if path == "/":
        raise PermissionDenied("the root is never deleted")
    if current is None:
        raise NotFound()
    if expected_version is not None and current.version != expected_version:
        raise VersionConflict()
    if current.is_dir and has_children:
        raise DirectoryNotEmpty()
    return Plan(deletes=(current,)), current


def plan_delete_tree(
    path: str,
    expected_version: int | None,
    top: Entry | None,
    below: Sequence[Entry],
    actor: str | None,
) -> tuple[Plan, list[Entry]]:
    """Delete ``path`` and its whole subtree (``/`` itself stays) iff ``actor`` may delete every
    entry of it as stored now (``actor`` None: an admin). All or nothing; deepest first."""
    if top is None:
        raise NotFound()
    if expected_version is not None and top.version != expected_version:
        raise VersionConflict()
    if actor is not None and any(e.owner != actor for e in (top, *below)):
        raise PermissionDenied()
    removed = deepest_first(below)
    if path != "/":
        removed.append(top)
    return Plan(deletes=tuple(removed)), removed


def move_reads(src: str, dst: str) -> list[str]:
    """Paths ``plan_move`` needs besides the source subtree: source, destination, its ancestors."""
    return [src, dst, *ancestors(dst)]


def plan_move(
    src: str,
    dst: str,
    expected_version: int,
    dst_expected: int | None,
    parents: NewParents | None,
    placement: Placement | None,
    known: Mapping[str, Entry | None],
    below: Sequence[Entry],
    dst_has_children: bool,
) -> tuple[Plan, tuple[Entry, Entry | None]]:
    """Move/rename ``src`` (and its subtree) to ``dst``, optionally switching the file's
    placement; ``dst == src`` only switches the placement. A directory's placement (blob key
    None) switches only in place and only its backend and owner node; its subtree is untouched.

    ``dst_expected``: None means the destination must be absent; a version means the destination
    must be exactly that version (the occupant the caller authorised), and is replaced. Returns the
    moved entry and the replaced occupant. Every moved entry's version is bumped."""
    current = known.get(src)
    if current is None:
        raise NotFound()
    if current.version != expected_version:
        raise VersionConflict()
    if src == "/" or dst == "/":
        raise BadRequest("cannot move the root directory")
    if dst.startswith(src + "/"):
        raise BadRequest("cannot move a directory into itself")
    if placement is not None and current.is_dir != (placement.blob_key is None):
        raise BadRequest("a file's placement names a blob, a directory's none")
    if placement is not None and current.is_dir and dst != src:
        raise BadRequest("a directory changes its owner node only in place")

    def placed(entry: Entry) -> Entry:
        if placement is None:
            return entry
        if entry.is_dir:  # no bytes: only the owner node (and backend) the record names
            return replace(
                entry, backend_type=placement.backend_type, instance_id=placement.instance_id
            )
        return replace(
            entry,
            backend_type=placement.backend_type,
            instance_id=placement.instance_id,
            blob_key=placement.blob_key,
            size=placement.size,
        )

    if dst == src:
        moved = placed(replace(current, version=current.version + 1))
        return Plan(deletes=(current,), puts=(moved,)), (moved, None)
    occupant = known.get(dst)
    if dst_expected is None:
        if occupant is not None:
            raise AlreadyExists("destination already exists")
    else:
        if occupant is None or occupant.version != dst_expected:
            raise VersionConflict()
        if occupant.is_dir != current.is_dir:
            raise AlreadyExists("destination exists with another type")
        if occupant.is_dir and dst_has_children:
            raise DirectoryNotEmpty()
    made = _missing_parents(dst, known, parents, ParentMissing())
    moved = placed(replace(current, path=dst, version=current.version + 1))
    cut = len(src)
    rekeyed = [replace(e, path=dst + e.path[cut:], version=e.version + 1) for e in below]
    deletes = (current, *below, *((occupant,) if occupant is not None else ()))
    return Plan(deletes=deletes, puts=(*made, moved, *rekeyed)), (moved, occupant)


# ---- erasure layouts as one msgpack blob -------------------------------------------------------
def pack_layout(layout: ErasureLayout) -> bytes:
    data = {
        "file_path": layout.file_path,
        "original_size": layout.original_size,
        "data_shards": layout.data_shards,
        "parity_shards": layout.parity_shards,
        "shard_size": layout.shard_size,
        "upload_id": layout.upload_id,
        "shards": [
            [s.index, s.instance_id, s.backend_type, s.path, s.size, s.checksum]
            for s in layout.shards
        ],
        "block_size": layout.block_size,
        "frame": layout.frame,
        "tail": layout.tail,
    }
    packed: bytes = msgpack.packb(data, use_bin_type=True)
    return packed


def unpack_layout(blob: bytes) -> ErasureLayout:
    data = msgpack.unpackb(blob, raw=False)
    return ErasureLayout(
        file_path=data["file_path"],
        original_size=data["original_size"],
        data_shards=data["data_shards"],
        parity_shards=data["parity_shards"],
        shard_size=data["shard_size"],
        upload_id=data["upload_id"],
        shards=tuple(ShardInfo(*s) for s in data["shards"]),
        block_size=data.get("block_size", 0),
        frame=data.get("frame", "sha256"),
        tail=data.get("tail", False),
    )
