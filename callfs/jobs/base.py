"""The WorkQueue seam: durable background work, claimed with a lease, acknowledged when done.

Work scheduling is not the namespace: a queue item is never a metadata write, and acknowledging one
changes no entry. Every implementation (sqlite, postgres, redis, raft) passes
``callfs/tests/contract/test_work_queue.py``.

- ``enqueue`` appends an item durably.
- ``claim`` leases up to ``limit`` due items (never leased, or their lease ran out) to ``worker``
  until ``now + lease``, oldest first, atomically: while a lease runs, no other worker of the
  cluster gets that item. A worker that dies simply lets its leases run out.
- ``renew`` extends to ``now + lease`` the lease of those ``ids`` still leased to ``worker`` (a
  lease that ran out but that no other worker has claimed yet counts: nobody else holds it) and
  returns them, ascending; an item acknowledged, handed back or claimed by another worker since is
  left alone and missing from the answer. Atomic per item against ``claim``: an item is renewed or
  claimed by another, never both. A live worker renews well within its lease, so the lease can be
  short and the items of a dead worker are taken over soon after.
- ``ack`` removes items still leased by ``worker``; ``retry`` hands them back, due again at
  ``not_before`` (backoff).

Errors: every method raises the store's ``CallFSError`` (``Unavailable`` when it cannot be
reached); a method that raised may or may not have taken effect.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from callfs.model import WorkItem

__all__ = ["WorkItem", "WorkQueue"]


class WorkQueue(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def enqueue(self, kind: str, key: str, arg: str, now: float) -> None: ...

    async def claim(self, worker: str, limit: int, lease: float, now: float) -> list[WorkItem]: ...

    async def renew(
        self, worker: str, ids: Sequence[int], lease: float, now: float
    ) -> list[int]: ...

    async def ack(self, worker: str, ids: Sequence[int]) -> None: ...

    async def retry(self, worker: str, ids: Sequence[int], not_before: float) -> None: ...

    async def backlog(self) -> int: ...
