"""The WorkQueue seam: durable background work, claimed with a lease, acknowledged when done.

Work scheduling is not the namespace: a queue item is never a metadata write, and acknowledging one
changes no entry. Every implementation (sqlite, postgres, redis) passes
``callfs/tests/contract/test_work_queue.py``.

- ``enqueue`` appends an item durably.
- ``claim`` leases up to ``limit`` due items (never leased, or their lease ran out) to ``worker``
  until ``now + lease``, oldest first, atomically: while a lease runs, no other worker of the
  cluster gets that item. A worker that dies simply lets its leases run out.
- ``ack`` removes items still leased by ``worker``; ``retry`` hands them back, due again at
  ``not_before`` (backoff).
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

    async def ack(self, worker: str, ids: Sequence[int]) -> None: ...

    async def retry(self, worker: str, ids: Sequence[int], not_before: float) -> None: ...

    async def backlog(self) -> int: ...
