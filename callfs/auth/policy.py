"""The owner permission model (API.md §5), as pure functions over metadata records.

Read: anything that exists. Write: an existing directory (anyone may create children in it), or a
file the caller owns; a missing target defers to its immediate parent (a missing parent allows the
write).
Delete: only the owner. ``root`` and ``internal-proxy`` pass every check.
"""

from __future__ import annotations

from callfs.errors import NotFound, PermissionDenied
from callfs.model import Entry, Identity


def check_read(who: Identity, target: Entry | None) -> Entry:
    if target is None:
        raise NotFound()
    return target


def _may_write_existing(who: Identity, entry: Entry) -> bool:
    return who.is_admin or entry.owner == who.user_id or entry.is_dir


def check_write(who: Identity, target: Entry | None, parent: Entry | None) -> None:
    if target is not None:
        if not _may_write_existing(who, target):
            raise PermissionDenied()
        return
    if parent is not None and not _may_write_existing(who, parent):
        raise PermissionDenied()


def may_delete(who: Identity, entry: Entry) -> bool:
    return who.is_admin or entry.owner == who.user_id


def check_delete(who: Identity, target: Entry | None) -> Entry:
    if target is None:
        raise NotFound()
    if not may_delete(who, target):
        raise PermissionDenied()
    return target
