"""The LockManager seam: mutual exclusion on a key across every node that shares the manager.

Keys are ``file:<engine path>`` and ``dir:<engine path>`` (API.md §14). Every implementation passes
``callfs/tests/contract/test_locks.py``.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Protocol


class LockManager(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def hold(self, key: str, timeout: float) -> AbstractAsyncContextManager[None]:
        """``async with locks.hold(key, timeout):`` waits up to ``timeout`` seconds for the lock,
        then raises ``LockTimeout``; never fails at once because the key is busy. The lock is
        released on exit, whatever happened inside. A lease-based implementation renews the lease
        while held and raises ``Unavailable`` on exit (or sooner) if the lease was lost."""
        ...

    @property
    def held(self) -> int:
        """How many locks this node currently holds (for the ``callfs_active_locks`` gauge)."""
        ...
