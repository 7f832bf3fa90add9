"""The engine: every namespace use case, independent of HTTP.

Handlers parse, call one method here, render. The engine authorizes (§5), decides conflicts, streams
bytes to a backend, and commits metadata under the path lock (§14): bytes are staged (durable, not
yet visible) before the lock is taken, so a slow upload never holds a lock; under the lock the bytes
are published and the metadata committed, and only then is the write acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, AsyncExitStack, suppress
from dataclasses import dataclass, replace

from callfs.auth.policy import check_delete, check_read, check_write, may_delete
from callfs.errors import (
    AlreadyExists,
    BadRequest,
    CallFSError,
    DirectoryNotEmpty,
    InternalError,
    NotFound,
    PermissionDenied,
    RemoteOwner,
    Unavailable,
)
from callfs.locks.base import LockManager
from callfs.metadata.base import MetadataStore
from callfs.metrics import Metrics
from callfs.model import INTERNAL_PROXY_USER, BackendType, Entry, EntryType, Identity, parent_of
from callfs.paths import CanonicalPath
from callfs.storage.base import ByteStream, StagedObject, StorageBackend
from callfs.storage.peer import PeerClient

log = logging.getLogger(__name__)

#: Deep enough for any tree the path limits allow (4096 bytes -> at most 2048 segments).
_WHOLE_TREE = 4096


@dataclass(frozen=True, slots=True)
class EngineSettings:
    instance_id: str
    default_backend: str
    lock_timeout: float = 30.0
    file_op_timeout: float = 10.0
    known_instances: frozenset[str] = frozenset()
    #: HA replication (§13): the backend that receives a copy of every regular file change.
    replica_backend: str | None = None
    require_replica_success: bool = False


@dataclass(frozen=True, slots=True)
class MoveRequest:
    destination: CanonicalPath
    backend: str | None = None
    instance: str | None = None
    overwrite: bool = False
    create_parents: bool = False


@dataclass(frozen=True, slots=True)
class OpenedFile:
    entry: Entry
    stream: ByteStream


class Engine:
    def __init__(
        self,
        meta: MetadataStore,
        locks: LockManager,
        backends: Mapping[str, StorageBackend],
        settings: EngineSettings,
        clock: Callable[[], float] = time.time,
        peers: PeerClient | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.peers = peers
        self._metrics = metrics
        #: Called after a change is queued for the replica (wakes the replication worker).
        self.on_replication_queued: Callable[[], None] | None = None
        self.meta = meta
        self.locks = locks
        self.backends = dict(backends)
        self.settings = settings
        self._clock = clock

    # ---- helpers -------------------------------------------------------------------------
    def _count(self, operation: str, backend_type: str) -> None:
        """``callfs_file_operations_total`` (§16): create, read, update, delete, rename."""
        if self._metrics is not None:
            self._metrics.file_ops.labels(operation, backend_type).inc()

    def _now(self) -> int:
        return int(self._clock())

    def backend(self, kind: str) -> StorageBackend:
        """The configured backend of ``kind``; a disabled backend is a server-side problem (500)."""
        found = self.backends.get(kind)
        if found is None:
            log.error("backend %r is needed but not configured", kind)
            raise InternalError()
        return found

    def _default_kind(self) -> str:
        return self.settings.default_backend or BackendType.LOCALFS.value

    def _instance_for(self, kind: str) -> str | None:
        """localfs items belong to this node; S3 items to no node (any node serves them)."""
        return self.settings.instance_id if kind == BackendType.LOCALFS else None

    def _is_remote(self, entry: Entry) -> bool:
        return entry.instance_id is not None and entry.instance_id != self.settings.instance_id

    def _route(self, entry: Entry) -> None:
        """Raise ``RemoteOwner`` when another node holds the item's bytes."""
        if self._is_remote(entry):
            assert entry.instance_id is not None
            raise RemoteOwner(entry.path, entry.instance_id, entry.is_dir, entry.backend_type)

    def _lock(self, kind: str, path: str) -> AbstractAsyncContextManager[None]:
        return self.locks.hold(f"{kind}:{path}", self.settings.lock_timeout)

    async def _lookup(self, path: str) -> tuple[Entry | None, Entry | None]:
        """The target and its immediate parent, fetched concurrently."""
        if path == "/":
            return await self.meta.get("/"), None
        target, parent = await asyncio.gather(self.meta.get(path), self.meta.get(parent_of(path)))
        return target, parent

    async def _ensure_parents(
        self, owner: str, path: str, parent: Entry | None, kind: str | None = None
    ) -> None:
        """Make every missing ancestor of ``path`` a directory owned by ``owner`` (§9.5).

        Every stored entry's parent exists, so an existing immediate parent means nothing to do.
        Raises ``AlreadyExists`` when an ancestor is a file."""
        if parent is not None:
            if not parent.is_dir:
                raise AlreadyExists("a parent path is a file")
            return
        missing: list[str] = []
        cursor = parent_of(path)
        while cursor != "/":
            found = await self.meta.get(cursor)
            if found is not None:
                if not found.is_dir:
                    raise AlreadyExists("a parent path is a file")
                break
            missing.append(cursor)
            cursor = parent_of(cursor)
        for ancestor in reversed(missing):
            await self._make_dir(owner, ancestor, kind or self._default_kind())

    async def _make_dir(self, owner: str, path: str, kind: str) -> bool:
        """Create one directory whose parent exists. False if it already was a directory."""
        backend = self.backend(kind)
        async with self._lock("dir", path):
            existing = await self.meta.get(path)
            if existing is not None:
                if existing.is_dir:
                    return False
                raise AlreadyExists("path exists as file, cannot create directory")
            await backend.mkdir(path)
            now = self._now()
            entry = Entry(
                path=path,
                type=EntryType.DIRECTORY,
                size=0,
                owner=owner,
                mtime=now,
                backend_type=BackendType(kind),
                instance_id=self._instance_for(kind),
                created_at=now,
            )
            try:
                await self.meta.create(entry)
            except AlreadyExists:
                again = await self.meta.get(path)
                if again is not None and again.is_dir:
                    return False
                raise
            return True

    def _create_conflict(self, existing: Entry, want_dir: bool) -> CallFSError | None:
        """The §9.5 answer when something already exists at a create's path (None: 200 mkdir)."""
        if self._is_remote(existing):
            assert existing.instance_id is not None
            return RemoteOwner(
                existing.path, existing.instance_id, existing.is_dir, existing.backend_type
            )
        if want_dir:
            if existing.is_dir:
                return None
            return AlreadyExists("path exists as file, cannot create directory")
        if existing.is_dir:
            return AlreadyExists("path exists as directory, cannot create file")
        return AlreadyExists("file already exists, use PUT to update")

    # ---- reads ---------------------------------------------------------------------------
    async def stat(self, who: Identity, path: CanonicalPath) -> Entry:
        entry = check_read(who, await self.meta.get(path.path))
        return entry

    async def open_file(
        self, who: Identity, entry: Entry, offset: int = 0, length: int | None = None
    ) -> ByteStream:
        """Open the bytes of a file entry already looked up (and read-authorized) by ``stat``."""
        del who  # read access was decided by stat(); kept for symmetry with the write paths
        if entry.is_dir:
            raise BadRequest("path is a directory")
        self._count("read", entry.backend_type.value)
        try:
            async with asyncio.timeout(self.settings.file_op_timeout):
                if self._is_remote(entry) and self.peers is not None:
                    assert entry.instance_id is not None
                    return await self.peers.open_read(entry.instance_id, entry.path, offset, length)
                self._route(entry)
                if length is None:
                    # The record's size is the truth: reading exactly that much also lets a backend
                    # answer small files inline.
                    length = max(entry.size - offset, 0)
                return await self.backend(entry.backend_type).open_read(entry.path, offset, length)
        except TimeoutError as exc:
            raise Unavailable("timed out opening the file") from exc

    async def list_directory(
        self, who: Identity, path: CanonicalPath, recursive: bool, max_depth: int
    ) -> tuple[Entry, list[Entry]]:
        entry = check_read(who, await self.meta.get(path.path))
        if not entry.is_dir:
            raise BadRequest("path is not a directory")
        if recursive and max_depth > 0:
            return entry, await self.meta.list_tree(entry.path, max_depth)
        return entry, await self.meta.list_children(entry.path)

    # ---- creates and writes --------------------------------------------------------------
    async def make_directory(self, who: Identity, path: CanonicalPath) -> bool:
        """POST of a directory form path. True if created (201), False if it existed (200)."""
        target, parent = await self._lookup(path.path)
        check_write(who, target, parent)
        if target is not None:
            conflict = self._create_conflict(target, want_dir=True)
            if conflict is not None:
                raise conflict
            return False
        kind = self._default_kind()
        await self._ensure_parents(who.user_id, path.path, parent, kind)
        return await self._make_dir(who.user_id, path.path, kind)

    async def create_file(
        self, who: Identity, path: CanonicalPath, chunks: AsyncIterable[bytes]
    ) -> Entry:
        """POST of a file: 201 on success; 409 if anything exists at the path."""
        target, parent = await self._lookup(path.path)
        check_write(who, target, parent)
        if target is not None:
            conflict = self._create_conflict(target, want_dir=False)
            assert conflict is not None
            raise conflict
        if parent is not None and not parent.is_dir:
            raise AlreadyExists("a parent path is a file")
        kind = self._default_kind()
        staged = await self.backend(kind).stage(path.path, chunks)
        try:
            await self._ensure_parents(who.user_id, path.path, parent, kind)
            async with self._lock("file", path.path):
                existing = await self.meta.get(path.path)
                if existing is not None:
                    conflict = self._create_conflict(existing, want_dir=False)
                    assert conflict is not None
                    raise conflict
                return await self._publish_new(who.user_id, path.path, kind, staged)
        except BaseException:
            await staged.discard()
            raise

    async def _publish_new(self, owner: str, path: str, kind: str, staged: StagedObject) -> Entry:
        await staged.publish()
        now = self._now()
        entry = Entry(
            path=path,
            type=EntryType.FILE,
            size=staged.size,
            owner=owner,
            mtime=now,
            backend_type=BackendType(kind),
            instance_id=self._instance_for(kind),
            created_at=now,
        )
        stored = await self.meta.create(entry)
        self._count("create", kind)
        await self._replicate(stored)
        return stored

    async def put_file(
        self, who: Identity, path: CanonicalPath, chunks: AsyncIterable[bytes]
    ) -> tuple[Entry, bool]:
        """PUT: create (True) or replace (False) a file's content atomically; last writer wins."""
        target, parent = await self._lookup(path.path)
        check_write(who, target, parent)
        if target is not None:
            if target.is_dir:
                raise BadRequest("path is a directory")
            self._route(target)
            if target.backend_type is BackendType.ERASURE:
                raise BadRequest("erasure coding is not enabled on this node")
            kind = target.backend_type.value
        else:
            if parent is not None and not parent.is_dir:
                raise AlreadyExists("a parent path is a file")
            kind = self._default_kind()
        staged = await self.backend(kind).stage(path.path, chunks)
        try:
            if target is None:
                await self._ensure_parents(who.user_id, path.path, parent, kind)
            async with self._lock("file", path.path):
                current = await self.meta.get(path.path)
                if current is None:
                    return await self._publish_new(who.user_id, path.path, kind, staged), True
                if current.is_dir:
                    raise BadRequest("path is a directory")
                check_write(who, current, None)
                await staged.publish()
                # Normally the same node and backend. If another node (or backend) created the file
                # while our body streamed, last writer wins: this node takes the file over, and the
                # record switches atomically to the bytes just published here.
                updated = replace(
                    current,
                    size=staged.size,
                    mtime=self._now(),
                    backend_type=BackendType(kind),
                    instance_id=self._instance_for(kind),
                )
                stored = await self.meta.update(updated, current.version)
                self._count("update", kind)
                await self._replicate(stored)
                if current.backend_type.value != kind and not self._is_remote(current):
                    await self._drop_bytes(current)
                elif self._is_remote(current):
                    log.warning(
                        "took over a file created concurrently on node %s; its old "
                        "bytes there are unreferenced",
                        current.instance_id,
                    )
                return stored, False
        except BaseException:
            await staged.discard()
            raise

    # ---- delete --------------------------------------------------------------------------
    async def delete(self, who: Identity, path: CanonicalPath, recursive: bool) -> None:
        target = check_delete(who, await self.meta.get(path.path))
        self._route(target)
        if not target.is_dir:
            async with self._lock("file", target.path):
                current = await self.meta.get(target.path)
                if current is None:
                    raise NotFound()
                await self.meta.delete(current.path)
            self._count("delete", current.backend_type.value)
            await self._drop_bytes(current)
            await self._replicate_delete(current)
            return
        if recursive:
            await self._delete_tree(who, target)
            return
        async with self._lock("dir", target.path):
            if await self.meta.has_children(target.path):
                raise DirectoryNotEmpty()
            if target.path == "/":
                return  # "/" itself is never removed
            await self.meta.delete(target.path)
        await self._drop_bytes(target)

    async def _delete_tree(self, who: Identity, top: Entry) -> None:
        async with self._lock("dir", top.path):
            below = await self.meta.list_tree(top.path, _WHOLE_TREE)
            if not all(may_delete(who, e) for e in below):
                raise PermissionDenied()
            for entry in below:
                if self._is_remote(entry):
                    # Bytes on another node: removing only our metadata would orphan them.
                    raise BadRequest("directory holds items owned by another node")
            removed = await self.meta.delete_tree(top.path)
            if top.path != "/":
                await self.meta.delete(top.path)
                removed.append(top)
        for entry in removed:  # deepest first
            await self._drop_bytes(entry)

    # ---- HA replication (§13) ----------------------------------------------------------
    def _replica_for(self, entry: Entry) -> StorageBackend | None:
        kind = self.settings.replica_backend
        if not kind or entry.is_dir or entry.backend_type.value in (kind, BackendType.ERASURE):
            return None
        return self.backend(kind)

    async def _replica_failed(self, what: str) -> None:
        """``require_replica_success``: the request fails (500) though the primary change stands."""
        if self._metrics is not None:
            self._metrics.errors.labels("replication", what).inc()
        log.error("replica %s failed; the primary change stands", what)
        raise InternalError()

    async def _replicate(self, entry: Entry) -> None:
        """After a create or update: copy now (``require_replica_success``) or queue the change
        durably for the replication worker."""
        await self._replica_change(entry, "put")

    async def _replicate_delete(self, entry: Entry) -> None:
        await self._replica_change(entry, "delete")

    async def _replica_change(self, entry: Entry, op: str) -> None:
        if self._replica_for(entry) is None:
            return
        if not self.settings.require_replica_success:
            await self.meta.enqueue_replication(entry.path, op, self._clock())
            if self.on_replication_queued is not None:
                self.on_replication_queued()
            return
        try:
            await self.replicate_now(entry.path)
        except (CallFSError, OSError):
            await self._replica_failed(op)

    async def replicate_now(self, path: str) -> None:
        """Make the replica match the primary for ``path`` now: copy the current file (whole,
        re-read from wherever it lives), or delete the replica copy when the file is gone.
        Idempotent, so a change applied twice, or by another node, is harmless."""
        entry = await self.meta.get(path)
        kind = self.settings.replica_backend
        if not kind:
            return
        replica = self.backend(kind)
        if entry is None or entry.is_dir:
            with suppress(NotFound):
                await replica.delete(path)
            return
        if self._replica_for(entry) is None:
            return
        stream = await self.open_file(Identity(INTERNAL_PROXY_USER), entry)
        await _copy_into(replica, path, stream)

    async def _drop_bytes(self, entry: Entry) -> None:
        """Bytes go after the metadata; a failure here is only logged (§9.8)."""
        backend = self.backends.get(entry.backend_type)
        if backend is None:
            return
        try:
            await backend.delete(entry.path)
        except NotFound:
            pass
        except (CallFSError, OSError):
            log.warning("could not remove the bytes of a deleted item", exc_info=True)

    # ---- move ----------------------------------------------------------------------------
    async def move(self, who: Identity, src: CanonicalPath, req: MoveRequest) -> str:
        """PATCH (§9.7): rename or move a file or directory tree; returns the new engine path."""
        source = check_delete(who, await self.meta.get(src.path))
        dst = req.destination.path
        dst_entry, dst_parent = await self._lookup(dst)
        check_write(who, dst_entry, dst_parent)

        kind = req.backend if req.backend is not None else source.backend_type.value
        instance = req.instance
        if src.path == "/" or dst == "/":
            raise BadRequest("cannot move the root directory")
        if kind not in (b.value for b in BackendType):
            raise BadRequest("backend must be one of: localfs, s3, erasure")
        if (
            instance is not None
            and instance != self.settings.instance_id
            and instance not in self.settings.known_instances
        ):
            raise BadRequest("unknown instance")
        changes_backend = kind != source.backend_type.value
        changes_instance = instance is not None and instance != (
            source.instance_id or self.settings.instance_id
        )
        if dst == src.path and not changes_backend and not changes_instance:
            raise BadRequest("destination equals source")
        if dst.startswith(src.path + "/"):
            raise BadRequest("cannot move a directory into itself")
        if dst_parent is None and not req.create_parents:
            raise BadRequest("destination parent does not exist")
        if source.is_dir and (changes_backend or changes_instance):
            raise BadRequest("a directory cannot change backend or instance")
        if BackendType.ERASURE in (source.backend_type, kind) and (
            changes_backend or kind == BackendType.ERASURE
        ):
            raise BadRequest("cannot move to or from the erasure backend")
        if changes_instance:
            raise BadRequest("moving to another instance is not supported by this node yet")
        if not changes_backend:
            self._route(source)

        if dst_entry is not None and dst != src.path:
            if not req.overwrite:
                raise AlreadyExists("destination already exists")
            if dst_entry.is_dir != source.is_dir:
                raise AlreadyExists("destination exists with another type")
            if dst_entry.is_dir and await self.meta.has_children(dst):
                raise DirectoryNotEmpty()
            check_delete(who, dst_entry)
            self._route(dst_entry)

        await self._ensure_parents(source.owner, dst, dst_parent, source.backend_type.value)
        async with AsyncExitStack() as held:
            for key in sorted({src.path, dst}):  # one global order: no lock-order deadlock
                await held.enter_async_context(self._lock("file", key))
            current = await self.meta.get(src.path)
            if current is None:
                raise NotFound()
            occupant = await self.meta.get(dst) if dst != src.path else None
            if occupant is not None:
                if not req.overwrite:
                    raise AlreadyExists("destination already exists")
                await self.meta.delete(dst)
                await self._drop_bytes(occupant)
            if changes_backend:
                await self._move_across_backends(current, dst, kind)
            else:
                backend = self.backend(current.backend_type)
                if current.backend_type is not BackendType.ERASURE:
                    await backend.move(current.path, dst)
                await self.meta.move_tree(current.path, dst)
            self._count("rename", kind)
        return dst

    async def _move_across_backends(self, source: Entry, dst: str, kind: str) -> None:
        """Copy the bytes to the other backend, re-key and switch the metadata, then drop the
        source bytes: the source goes only once the destination is durable and committed."""
        old = self.backend(source.backend_type)
        new = self.backend(kind)
        staged_size = await _copy_into(new, dst, await old.open_read(source.path))
        moved = replace(
            source,
            path=dst,
            backend_type=BackendType(kind),
            instance_id=self._instance_for(kind),
            size=staged_size,
        )
        if dst == source.path:
            await self.meta.update(moved, source.version)
        else:
            await self.meta.create(replace(moved, version=1))
            await self.meta.delete(source.path)
        try:
            await old.delete(source.path)
        except (CallFSError, OSError):
            log.warning("could not remove the source bytes after a backend move", exc_info=True)


async def _copy_into(backend: StorageBackend, path: str, stream: ByteStream) -> int:
    """Stream ``stream`` into ``backend`` at ``path`` and publish it; returns the size written.
    The stream is closed, and the staged object discarded if publishing fails."""
    try:
        staged = await backend.stage(path, _iterate(stream))
    finally:
        await stream.aclose()
    try:
        await staged.publish()
    except BaseException:
        await staged.discard()
        raise
    return staged.size


async def _iterate(stream: ByteStream) -> AsyncIterable[bytes]:
    async for chunk in stream:
        yield chunk
