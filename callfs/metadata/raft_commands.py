"""The Raft log's command format: versioned, deterministic, plain msgpack.

A command is ``[level, request_id, now, name, args]``. The proposer stamps ``request_id`` (so a
retry after "maybe applied" is answered from the state machine's memory, never applied twice) and
``now`` (the only clock ``apply`` may use). ``level`` is the command level that introduced
``name`` (``SINCE``). Every node announces the level it applies (``member_level``, kept in the
replicated member table). A proposer sends a command above level 1 only once every voter has
announced that level (``RaftService.supports``), and ``apply`` refuses it, the same way on every
replica, while the member table records a lower level; a replica whose build is below a command
the group accepted anyway stops the node (``StateMachine.on_newer_command``) rather than drift.
So during a rolling upgrade new commands wait until the last node runs the new version. Builds
from before levels ignore the field: the mechanism protects upgrades that start from a build
with levels. Arguments and results are plain lists and scalars: a log written by this version
stays readable whatever Python objects look like later.

A result is ``[True, value]`` or ``[False, [error class name, message]]``: the error a store
command raises on a single node is the error every replica computes, and the one the caller gets.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack

from callfs import errors
from callfs.errors import CallFSError, InternalError
from callfs.metadata.common import entry_from_row, entry_to_row
from callfs.metadata.sqlite_ops import link_from_row, link_to_row
from callfs.model import BackendType, Entry, Link, NewParents, Placement, WorkItem

#: The command level this build applies. Adding a command (or changing what one does) raises
#: it, and the command goes into ``SINCE`` with the new level. Level 2 adds no command: it says
#: the node reads version-2 (incremental) snapshots (``fsm.SNAPSHOT2_LEVEL``).
LEVEL = 2
#: Command name -> the level that introduced it (absent: 1, the first set).
SINCE: dict[str, int] = {}


def level_of(name: str) -> int:
    return SINCE.get(name, 1)


def pack(value: Any) -> bytes:
    out: bytes = msgpack.packb(value, use_bin_type=True)
    return out


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def command(request_id: str, now: float, name: str, args: list[Any]) -> bytes:
    return pack([level_of(name), request_id, now, name, args])


# ---- plain forms of the records a command carries ---------------------------------------------
def entry_out(e: Entry | None) -> list[Any] | None:
    return None if e is None else list(entry_to_row(e)[:-2])


def entry_in(row: list[Any] | None) -> Entry | None:
    return None if row is None else entry_from_row(row)


def some_entry_in(row: list[Any]) -> Entry:
    entry = entry_in(row)
    if entry is None:
        raise InternalError("raft result is missing an entry")
    return entry


def parents_out(p: NewParents | None) -> list[Any] | None:
    return None if p is None else [p.owner, p.mtime, p.backend_type.value, p.instance_id]


def parents_in(v: list[Any] | None) -> NewParents | None:
    return None if v is None else NewParents(v[0], v[1], BackendType(v[2]), v[3])


def placement_out(p: Placement | None) -> list[Any] | None:
    return None if p is None else [p.backend_type.value, p.instance_id, p.blob_key, p.size]


def placement_in(v: list[Any] | None) -> Placement | None:
    return None if v is None else Placement(BackendType(v[0]), v[1], v[2], v[3])


def link_out(link: Link) -> list[Any]:
    return list(link_to_row(link))


def link_in(v: list[Any]) -> Link:
    return link_from_row(v)


def work_in(v: list[Any]) -> WorkItem:
    return WorkItem(v[0], v[1], v[2], v[3], v[4])


# ---- results ----------------------------------------------------------------------------------
def ok(value: Any) -> bytes:
    return pack([True, value])


def failed(exc: CallFSError) -> bytes:
    return pack([False, [type(exc).__name__, exc.message]])


def _error_class(name: str) -> Callable[[str], CallFSError]:
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, CallFSError) and name != "RemoteOwner":
        return cls
    return InternalError


def result(data: bytes) -> Any:
    """The value of a result, or raise the error it carries."""
    good, value = unpack(data)
    if good:
        return value
    name, message = value
    raise _error_class(name)(message)
