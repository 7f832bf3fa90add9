"""The Raft metadata store: every node holds the whole namespace (``cluster/fsm.py``).

Writes are the store commands of ``metadata/sqlite_ops.py`` committed through the Raft log
(``RaftService.execute``); reads run on the local replica after the read barrier, so a node never
serves data older than a write any node acknowledged (API.md §12.4).

The store reaches the group through ``ReplicatedLog``, which ``cluster/service.py``'s
``RaftService`` satisfies: ``cluster/`` builds on this package's SQL (``sqlite_ops``) and command
format (``raft_commands``), so nothing here imports ``cluster/``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from callfs.metadata import raft_commands as C
from callfs.metadata import sqlite_ops as ops
from callfs.metadata.base import ChildPosition
from callfs.metadata.common import order_tree, pack_layout
from callfs.model import Entry, ErasureLayout, Link, NewParents, Placement

T = TypeVar("T")


class ReplicatedLog(Protocol):
    """What the Raft store and work queue need of the group (``RaftService``)."""

    def start(self) -> None: ...

    async def close(self) -> None: ...

    async def execute(self, name: str, args: list[Any]) -> Any:
        """Commit one command of ``raft_commands`` and return its result (or raise its error)."""
        ...

    async def read(self, fn: Callable[[sqlite3.Connection], T], *, point: bool = False) -> T:
        """Run ``fn`` on the local replica after the read barrier (read-your-writes)."""
        ...


class RaftMetadataStore:
    def __init__(self, service: ReplicatedLog) -> None:
        self.service = service

    async def start(self) -> None:
        # Synchronous on purpose: pysyncobj's tick thread lives only as long as the thread that
        # built it, so the node is built here, on the event loop's (main) thread, before serving.
        self.service.start()

    async def close(self) -> None:
        await self.service.close()

    # ---- reads -------------------------------------------------------------------------------
    async def get(self, path: str) -> Entry | None:
        return await self.service.read(lambda c: ops.get(c, path), point=True)

    async def list_children(self, path: str) -> list[Entry]:
        return await self.service.read(lambda c: ops.list_children(c, path))

    async def list_children_page(
        self, path: str, after: ChildPosition | None, limit: int
    ) -> list[Entry]:
        return await self.service.read(lambda c: ops.list_children_page(c, path, after, limit))

    async def count_children(self, path: str) -> int:
        return await self.service.read(lambda c: ops.count_children(c, path))

    async def has_children(self, path: str) -> bool:
        return await self.service.read(lambda c: ops.has_children(c, path), point=True)

    async def list_tree(self, path: str, max_depth: int) -> list[Entry]:
        entries = await self.service.read(lambda c: ops.descendants(c, path))
        return order_tree(path, entries, max_depth)

    async def blobs_referenced(self, keys: Sequence[str]) -> set[str]:
        return await self.service.read(lambda c: ops.blobs_referenced(c, keys))

    # ---- conditional commands ------------------------------------------------------------------
    async def create(self, entry: Entry, parents: NewParents | None = None) -> Entry:
        row = await self.service.execute("create", [C.entry_out(entry), C.parents_out(parents)])
        return C.some_entry_in(row)

    async def update(self, entry: Entry, expected_version: int) -> Entry:
        row = await self.service.execute("update", [C.entry_out(entry), expected_version])
        return C.some_entry_in(row)

    async def delete(self, path: str, expected_version: int | None = None) -> Entry:
        return C.some_entry_in(await self.service.execute("delete", [path, expected_version]))

    async def delete_tree(
        self, path: str, expected_version: int | None = None, actor: str | None = None
    ) -> list[Entry]:
        rows = await self.service.execute("delete_tree", [path, expected_version, actor])
        return [C.some_entry_in(r) for r in rows]

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
        moved, occupant = await self.service.execute(
            "move",
            [
                src,
                dst,
                expected_version,
                dst_expected,
                C.parents_out(parents),
                C.placement_out(placement),
            ],
        )
        return C.some_entry_in(moved), C.entry_in(occupant)

    # ---- links ---------------------------------------------------------------------------------
    async def create_link(self, link: Link) -> None:
        await self.service.execute("create_link", [C.link_out(link)])

    async def get_link(self, token: str) -> Link | None:
        return await self.service.read(lambda c: ops.get_link(c, token), point=True)

    async def consume_link(self, token: str, used_at: float, used_by_ip: str) -> bool:
        return bool(await self.service.execute("consume_link", [token, used_at, used_by_ip]))

    async def sweep_links(self, now: float, used_before: float) -> int:
        return int(await self.service.execute("sweep_links", [now, used_before]))

    # ---- erasure layouts -------------------------------------------------------------------------
    async def put_erasure(self, layout: ErasureLayout) -> None:
        await self.service.execute("put_erasure", [layout.file_path, pack_layout(layout)])

    async def get_erasure(self, path: str) -> ErasureLayout | None:
        return await self.service.read(lambda c: ops.get_erasure(c, path), point=True)

    async def delete_erasure(self, path: str) -> None:
        await self.service.execute("delete_erasure", [path])
