"""A MetadataStore wrapper that bounds every call by ``server.metadata_op_timeout`` (§9.3) and
records ``callfs_metadata_db_*`` metrics, so no store implementation repeats either."""

from __future__ import annotations

import time
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from callfs.concurrency import bounded
from callfs.errors import Unavailable
from callfs.metadata.base import ChildPosition, MetadataStore
from callfs.metrics import Metrics
from callfs.model import Entry, ErasureLayout, Link, NewParents, Placement

T = TypeVar("T")


class GuardedMetadataStore:
    def __init__(self, inner: MetadataStore, op_timeout: float, metrics: Metrics | None) -> None:
        self.inner = inner
        self._timeout = op_timeout
        self._metrics = metrics

    async def _call(self, operation: str, call: Coroutine[Any, Any, T]) -> T:
        started = time.perf_counter()
        try:
            return await bounded(call, self._timeout)  # no timer for a read answered inline
        except TimeoutError as exc:
            raise Unavailable("metadata store timed out") from exc
        finally:
            if self._metrics is not None:  # labels() answers from its cache (callfs.metrics)
                self._metrics.metadata_queries.labels(operation).inc()
                self._metrics.metadata_duration.labels(operation).observe(
                    time.perf_counter() - started
                )

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    async def get(self, path: str) -> Entry | None:
        return await self._call("get", self.inner.get(path))

    async def create(self, entry: Entry, parents: NewParents | None = None) -> Entry:
        return await self._call("create", self.inner.create(entry, parents))

    async def update(self, entry: Entry, expected_version: int) -> Entry:
        return await self._call("update", self.inner.update(entry, expected_version))

    async def delete(self, path: str, expected_version: int | None = None) -> Entry:
        return await self._call("delete", self.inner.delete(path, expected_version))

    async def delete_tree(
        self, path: str, expected_version: int | None = None, actor: str | None = None
    ) -> list[Entry]:
        return await self._call(
            "delete_tree", self.inner.delete_tree(path, expected_version, actor)
        )

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
        return await self._call(
            "move",
            self.inner.move(
                src,
                dst,
                expected_version=expected_version,
                dst_expected=dst_expected,
                parents=parents,
                placement=placement,
            ),
        )

    async def blobs_referenced(self, keys: Sequence[str]) -> set[str]:
        return await self._call("blobs_referenced", self.inner.blobs_referenced(keys))

    async def list_children(self, path: str) -> list[Entry]:
        return await self._call("list_children", self.inner.list_children(path))

    async def list_children_page(
        self, path: str, after: ChildPosition | None, limit: int
    ) -> list[Entry]:
        return await self._call(
            "list_children_page", self.inner.list_children_page(path, after, limit)
        )

    async def count_children(self, path: str) -> int:
        return await self._call("count_children", self.inner.count_children(path))

    async def has_children(self, path: str) -> bool:
        return await self._call("has_children", self.inner.has_children(path))

    async def list_tree(self, path: str, max_depth: int) -> list[Entry]:
        return await self._call("list_tree", self.inner.list_tree(path, max_depth))

    async def create_link(self, link: Link) -> None:
        await self._call("create_link", self.inner.create_link(link))

    async def get_link(self, token: str) -> Link | None:
        return await self._call("get_link", self.inner.get_link(token))

    async def consume_link(self, token: str, used_at: float, used_by_ip: str) -> bool:
        return await self._call("consume_link", self.inner.consume_link(token, used_at, used_by_ip))

    async def sweep_links(self, now: float, used_before: float) -> int:
        return await self._call("sweep_links", self.inner.sweep_links(now, used_before))

    async def put_erasure(self, layout: ErasureLayout) -> None:
        await self._call("put_erasure", self.inner.put_erasure(layout))

    async def get_erasure(self, path: str) -> ErasureLayout | None:
        return await self._call("get_erasure", self.inner.get_erasure(path))

    async def delete_erasure(self, path: str) -> None:
        await self._call("delete_erasure", self.inner.delete_erasure(path))
