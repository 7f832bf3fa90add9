"""The engine: every namespace use case, independent of HTTP.

Handlers parse, call one method here, render. The engine authorizes (§5), decides conflicts, streams
bytes to a backend, and commits metadata. The write path (ARCHITECTURE.md "Data paths"):

1. the body streams into a staged object and is made durable under a NEW blob key of its own (the
   bytes of the version readers see are never touched); a slow upload holds no lock;
2. ONE conditional metadata command switches the entry's placement record to that key
   (create-if-absent with parents, replace-if-version, move with overwrite...): the store decides
   races atomically; locks only keep writers of one path from retrying against each other;
3. only after the commit is the write acknowledged, and the replaced version's blob reclaimed.

A command that is definitely refused leaves readers on the old version and its new blob is removed
at once; an ambiguous failure (a timeout: "maybe applied") leaves the blob to the orphan sweep
(``sweep_orphans``), which only removes blobs no entry names after a grace period.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from contextlib import AbstractAsyncContextManager, AsyncExitStack, suppress
from dataclasses import dataclass, field, replace
from typing import TypeVar

from callfs.auth.policy import check_delete, check_read, check_write
from callfs.concurrency import bounded
from callfs.core.peer import PeerClient
from callfs.core.tee import store_with_copy
from callfs.erasure.service import ErasureService, Profile, placement
from callfs.errors import (
    AlreadyExists,
    BadRequest,
    BlobDamaged,
    CallFSError,
    DirectoryNotEmpty,
    InsufficientShards,
    InternalError,
    KeptChanging,
    LockTimeout,
    NotFound,
    ParentMissing,
    ParentNotDirectory,
    PeerUnavailable,
    PermissionDenied,
    RemoteOwner,
    Unavailable,
    VersionConflict,
    VersionMoved,
)
from callfs.jobs.base import WorkItem, WorkQueue
from callfs.locks.base import LockManager
from callfs.log import shown_path
from callfs.metadata.base import ChildPosition, MetadataStore
from callfs.metrics import Metrics
from callfs.model import (
    BackendType,
    Entry,
    EntryType,
    ErasureLayout,
    Identity,
    NewParents,
    Placement,
    parent_of,
)
from callfs.paths import CanonicalPath
from callfs.storage.base import (
    REPLICA_PREFIX,
    ByteStream,
    Chunk,
    LocalFile,
    StagedObject,
    StorageBackend,
    is_blob_key,
    new_blob_key,
    publish_or_discard,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

#: The longest pause between re-decisions after a lost race (``VersionConflict``).
_RACE_PAUSE_MAX = 0.05
#: Opens retried when a concurrent replace reclaimed the blob between stat and open.
_OPEN_RETRIES = 3
#: Orphan blobs younger than this are never swept (a write between publish and commit).
ORPHAN_GRACE = 3600.0
#: Work kinds of the WorkQueue (HA replication, §13).
REPLICA_PUT = "replica-put"
REPLICA_DELETE = "replica-delete"
#: A move decides (and copies) at least this many times when the item changed meanwhile.
_MOVE_TRIES = 3
#: Refusals after which a new blob is certainly unreferenced (no "maybe applied").
_DEFINITE = (
    AlreadyExists,
    BadRequest,
    DirectoryNotEmpty,
    KeptChanging,
    LockTimeout,  # the command never ran (only lock managers raise it)
    NotFound,
    PermissionDenied,
    RemoteOwner,
    VersionConflict,
)


def _copy_arg(entry: Entry) -> str:
    """A ``REPLICA_PUT`` item's argument: where the blob lives (``apply_work`` splits it)."""
    return f"{entry.backend_type.value}\t{entry.instance_id or ''}\t{entry.path}"


class WorkElsewhere(Exception):
    """A work item this node cannot carry out (another node's blob that no path names any more,
    or a copy to a replica this node does not write): the worker hands it back to the queue for
    the node that can, instead of calling it done. ``hopeless``: maybe no node can any more (this
    one replicates nothing, or the blob's node is no member): dropped once handed back for long
    (``core/replication.py``); otherwise it waits for its node however long that takes."""

    def __init__(self, why: str, *, hopeless: bool = False) -> None:
        super().__init__(why)
        self.hopeless = hopeless


def replica_key(blob_key: str) -> str:
    """Where the replica backend keeps its copy of a blob (apart from the blobs it owns)."""
    return REPLICA_PREFIX + blob_key


@dataclass(frozen=True, slots=True)
class EngineSettings:
    instance_id: str
    default_backend: str
    lock_timeout: float = 30.0
    file_op_timeout: float = 10.0
    known_instances: frozenset[str] = frozenset()
    #: HA replication (§13): the backend that receives a copy of every regular file version.
    replica_backend: str | None = None
    require_replica_success: bool = False
    #: Erasure coding (§11): whether this node writes shards (new erasure-coded files, a PUT's
    #: re-encoding; every node with an ``erasure`` service reads and deletes existing ones),
    #: and its defaults when a request does not name them.
    erasure_enabled: bool = False
    erasure_data_shards: int = 4
    erasure_parity_shards: int = 2


@dataclass(frozen=True, slots=True)
class ErasureRequest:
    """A POST's erasure parameters (§11.1); None fields take the node defaults."""

    data_shards: int | None = None
    parity_shards: int | None = None
    instances: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class MoveRequest:
    destination: CanonicalPath
    backend: str | None = None
    instance: str | None = None
    overwrite: bool = False
    create_parents: bool = False


@dataclass(slots=True)
class TreeMove:
    """What a directory's move to another node did (the PATCH answer reports it)."""

    moved_files: int = 0
    moved_bytes: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)
    #: Directories of the tree (itself included) now naming the target as their owner node.
    moved_dirs: int = 0

    def as_dict(self) -> dict[str, object]:
        return {
            "moved_files": self.moved_files,
            "moved_bytes": self.moved_bytes,
            "moved_dirs": self.moved_dirs,
            "skipped": self.skipped,
            "failed": self.failed,
        }


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
        queue: WorkQueue | None = None,
        erasure: ErasureService | None = None,
    ) -> None:
        self.peers = peers
        #: Erasure coding, when ``erasure.enabled`` (None: requests for it are ignored, §9.5).
        self.erasure = erasure
        self._metrics = metrics
        self._queue = queue
        #: Called after work is queued (wakes the work queue's worker).
        self.on_work_queued: Callable[[], None] | None = None
        self._meta = meta
        self._locks = locks
        self._backends = dict(backends)
        self.settings = settings
        self._clock = clock
        #: Blob keys whose replica copy was written while the body streamed (``_stage``), not yet
        #: committed: ``_replicate`` then has nothing to copy.
        self._copied: set[str] = set()

    # ---- helpers -------------------------------------------------------------------------
    def _count(self, operation: str, backend_type: str) -> None:
        """``callfs_file_operations_total`` (§16): create, read, update, delete, rename."""
        if self._metrics is not None:
            self._metrics.file_ops.labels(operation, backend_type).inc()

    def _now(self) -> int:
        return int(self._clock())

    def backend(self, kind: str) -> StorageBackend:
        """The configured backend of ``kind``; a disabled backend is a server-side problem (500)."""
        found = self._backends.get(kind)
        if found is None:
            log.error("backend %r is needed but not configured", kind)
            raise InternalError()
        return found

    def _default_kind(self) -> str:
        return self.settings.default_backend or BackendType.LOCALFS.value

    def _instance_for(self, kind: str) -> str | None:
        """localfs items belong to this node; S3 items to no node (any node serves them)."""
        return self.settings.instance_id if kind == BackendType.LOCALFS else None

    def is_remote(self, entry: Entry) -> bool:
        """True when another node holds the item's bytes (the API layer routes it there)."""
        return entry.instance_id is not None and entry.instance_id != self.settings.instance_id

    def _route(self, entry: Entry) -> None:
        """Raise ``RemoteOwner`` when another node holds the item's bytes."""
        if self.is_remote(entry):
            assert entry.instance_id is not None
            raise RemoteOwner(entry.path, entry.instance_id, entry.is_dir, entry.backend_type)

    def _lock(self, path: str) -> AbstractAsyncContextManager[None]:
        return self._locks.hold(f"file:{path}", self.settings.lock_timeout)

    async def _locked(self, paths: Iterable[str], command: Callable[[], Awaitable[T]]) -> T:
        """Run ``command`` holding the ``file:`` locks of ``paths`` (in one global order: no
        lock-order deadlock). §14: a lock covers a commit, never a body transfer or a copy, so
        concurrent writers of a path queue for the commit and never time out on another's bytes;
        ``_commit`` around it removes the new blob when the lock wait times out."""
        async with AsyncExitStack() as held:
            for path in sorted(set(paths)):
                await held.enter_async_context(self._lock(path))
            return await command()

    def _dir_lock(self, path: str) -> AbstractAsyncContextManager[None]:
        """§14: a directory create or delete holds ``dir:<path>`` over its commit. (Parents a
        create makes are decided by that create's one conditional command; they take none.)"""
        return self._locks.hold(f"dir:{path}", self.settings.lock_timeout)

    def _parents(self, owner: str, kind: str) -> NewParents:
        return NewParents(owner, self._now(), BackendType(kind), self._instance_for(kind))

    async def _lookup(self, path: str) -> tuple[Entry | None, Entry | None]:
        """The target and its immediate parent, fetched concurrently."""
        if path == "/":
            return await self._meta.get("/"), None
        target, parent = await asyncio.gather(self._meta.get(path), self._meta.get(parent_of(path)))
        return target, parent

    def _create_conflict(self, existing: Entry, want_dir: bool) -> CallFSError | None:
        """The §9.5 answer when something already exists at a create's path (None: 200 mkdir)."""
        if self.is_remote(existing):
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

    async def _retrying(self, attempt: Callable[[], Awaitable[T]], tries: int = 1) -> T:
        """Decide again on fresh reads when a conditional command lost a race.

        Writers of one path on other nodes or worker processes share no lock with this one
        (``dlm.type: local``), so a writer can lose many rounds in a row to a queue of writers
        elsewhere: 16 PUTs of one path over two processes lost eight straight rounds about one
        run in six. So the writer keeps deciding again, after a random pause that grows to
        ``_RACE_PAUSE_MAX``, until the lock timeout (the wait a writer queued on a lock is
        allowed anyway), and only then answers 503. It decides at least ``tries`` times
        whatever the time (a move that copies bytes may take longer than the lock timeout once)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.lock_timeout
        pause = 0.001
        while True:
            try:
                return await attempt()
            except VersionConflict:
                tries -= 1
                if loop.time() >= deadline and tries <= 0:
                    raise KeptChanging() from None
            await asyncio.sleep(random.uniform(0, pause))  # noqa: S311 (jitter, not a secret)
            pause = min(2 * pause, _RACE_PAUSE_MAX)

    # ---- reads ---------------------------------------------------------------------------
    async def find(self, path: str) -> Entry | None:
        """The entry at an engine path, or None (reads need no permission beyond existence)."""
        return await self._meta.get(path)

    async def stat(self, who: Identity, path: CanonicalPath) -> Entry:
        return check_read(who, await self._meta.get(path.path))

    async def open_file(
        self,
        who: Identity,
        entry: Entry,
        window: Callable[[Entry], tuple[int, int | None]] | None = None,
    ) -> tuple[Entry, ByteStream]:
        """Open the bytes of a file entry already looked up (and read-authorized) by ``stat``:
        ``window(entry)`` gives the offset and length (None: to the end; no ``window``: all).

        A concurrent replace may reclaim the blob ``entry`` names between the lookup and the
        open: the entry is then looked up again and its current version opened, its window
        decided again on its own size (which may raise ``RangeNotSatisfiable``). Returns the
        entry actually opened, which the response must describe (size, mtime, owner): never the
        headers of one version over the bytes of another."""
        del who  # read access was decided by stat(); kept for symmetry with the write paths
        for attempt in range(_OPEN_RETRIES + 1):
            if entry.is_dir:
                raise BadRequest("path is a directory")
            offset, length = window(entry) if window is not None else (0, None)
            try:
                stream = await self._open(entry, offset, length)
            except (NotFound, VersionMoved, InsufficientShards) as exc:
                # gone, moved on at its owner, or its shards dropped by the replace (shards go
                # before the layout record): the current version, if another, is opened instead
                fresh = await self._meta.get(entry.path)
                if fresh is not None and not fresh.is_dir and fresh.blob_key != entry.blob_key:
                    if attempt < _OPEN_RETRIES:
                        entry = fresh
                        continue
                    # the file exists but was replaced under every open: 503 (try again),
                    # never a 404 for a file that is there
                    raise KeptChanging() from exc
                if not isinstance(exc, VersionMoved):
                    raise
                if fresh is None:
                    raise NotFound() from exc  # deleted since
                raise KeptChanging() from exc  # never a 412 to a client (node to node only)
            if not (self.is_remote(entry) and self.peers is not None):
                self._count("read", entry.backend_type.value)  # a relayed read: the owner counts
            return entry, stream
        raise AssertionError("unreachable")

    async def _open(self, entry: Entry, offset: int, length: int | None) -> ByteStream:
        try:
            # no timer for a small local file, opened and read inline
            return await bounded(
                self._open_now(entry, offset, length), self.settings.file_op_timeout
            )
        except TimeoutError as exc:
            if self.is_remote(entry):  # §12.3: an owner that cannot be reached in time is a 502
                raise PeerUnavailable("owner node did not answer in time") from exc
            raise Unavailable("timed out opening the file") from exc

    async def _open_now(self, entry: Entry, offset: int, length: int | None) -> ByteStream:
        if self.is_remote(entry) and self.peers is not None:
            assert entry.instance_id is not None
            return await self.peers.open_read(
                entry.instance_id, entry.path, offset, length, entry.blob_key
            )
        self._route(entry)
        if entry.blob_key is None:
            raise NotFound()
        if entry.backend_type is BackendType.ERASURE:
            return await self._open_erasure(entry, offset, length)
        if length is None:
            # The record's size is the truth: reading exactly that much also lets a backend
            # answer small files inline.
            length = max(entry.size - offset, 0)
        backend = self.backend(entry.backend_type)
        stream = await backend.open_read(entry.blob_key, offset, length)
        if stream.length < length:
            # Shorter than its record (truncated on disk, a damaged object): never sent as a
            # short 200 a client takes for the whole file. §9.3: missing bytes are a 404.
            await stream.aclose()
            if self._metrics is not None:
                self._metrics.errors.labels("storage", "short_blob").inc()
            log.error(
                "the bytes of %s end %d bytes short of its record: damaged (callfs fsck lists "
                "it as size-mismatch)", shown_path(entry.path), length - stream.length,
            )  # fmt: skip
            raise BlobDamaged()
        return stream

    async def _open_erasure(self, entry: Entry, offset: int, length: int | None) -> ByteStream:
        layout = await self.erasure_layout(entry)
        if length is None:
            length = max(layout.original_size - offset, 0)
        return await self._erasure().open(layout, offset, length)

    async def erasure_layout(self, entry: Entry) -> ErasureLayout:
        """The layout an erasure-coded entry names (keyed by its upload id)."""
        layout = await self._meta.get_erasure(entry.blob_key or entry.path)
        if layout is None:
            raise NotFound("erasure info missing")
        return layout

    def _erasure(self) -> ErasureService:
        if self.erasure is None:
            # an erasure-coded file on a node with no backend to keep shards in
            raise BadRequest("erasure coding is not available on this node (no shard backend)")
        return self.erasure

    async def list_directory(
        self,
        who: Identity,
        path: CanonicalPath,
        recursive: bool,
        max_depth: int,
        *,
        after: ChildPosition | str | None = None,
        limit: int | None = None,
    ) -> tuple[Entry, list[Entry]]:
        """The directory and its listing (§9.10). With ``limit``: one page (§22) of at most
        ``limit`` direct children past ``after``, a (type, name) position or a plain name. A plain
        name stands for the child of that name (names are unique in a directory); a name no child
        has (deleted meanwhile) is taken as a file's, so a page never skips an entry, at worst it
        repeats directories. Recursive listings are not paged (400)."""
        entry = check_read(who, await self._meta.get(path.path))
        if not entry.is_dir:
            raise BadRequest("path is not a directory")
        if limit is not None:
            if recursive and max_depth > 0:
                raise BadRequest("limit is not supported on recursive listings")
            if isinstance(after, str):
                child = await self._meta.get(f"{entry.path.rstrip('/')}/{after}")
                after = (child.type if child is not None else EntryType.FILE, after)
            return entry, await self._meta.list_children_page(entry.path, after, limit)
        if recursive and max_depth > 0:
            return entry, await self._meta.list_tree(entry.path, max_depth)
        return entry, await self._meta.list_children(entry.path)

    async def directory_pages(
        self, directory: Entry, after: ChildPosition | None, page: int
    ) -> AsyncGenerator[list[Entry], None]:
        """The children of a directory ``list_directory`` returned, past ``after``, ``page`` at
        a time (a large listing streams: one page in memory, one store call per page)."""
        while True:
            items = await self._meta.list_children_page(directory.path, after, page)
            if items:
                yield items
            if len(items) < page:
                return
            after = (items[-1].type, items[-1].name)

    async def count_children(self, directory: Entry) -> int:
        """How many children a directory ``list_directory`` returned has (an index count)."""
        return await self._meta.count_children(directory.path)

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
        now = self._now()
        entry = Entry(
            path=path.path,
            type=EntryType.DIRECTORY,
            size=0,
            owner=who.user_id,
            mtime=now,
            backend_type=BackendType(kind),
            instance_id=self._instance_for(kind),
            created_at=now,
        )
        try:
            async with self._dir_lock(path.path):
                await self._meta.create(entry, self._parents(who.user_id, kind))
        except AlreadyExists as exc:
            again = await self._meta.get(path.path)
            if again is None:
                raise
            conflict = self._create_conflict(again, want_dir=True)
            if conflict is not None:
                raise conflict from exc
            return False
        return True

    def _file_entry(self, owner: str, path: str, kind: str, staged: StagedObject) -> Entry:
        now = self._now()
        return Entry(
            path=path,
            type=EntryType.FILE,
            size=staged.size,
            owner=owner,
            mtime=now,
            backend_type=BackendType(kind),
            instance_id=self._instance_for(kind),
            created_at=now,
            blob_key=staged.key,
        )

    async def _stage(self, kind: str, chunks: AsyncIterable[bytes]) -> StagedObject:
        """Stream the body into a durable blob under a new key (not yet named by any entry).
        A ``LocalFile`` body (a finished resumable upload) goes through ``stage_file``: localfs
        takes the file itself, no copy."""
        if isinstance(chunks, LocalFile):
            return await publish_or_discard(
                await self.backend(kind).stage_file(new_blob_key(), chunks.path)
            )
        key = new_blob_key()
        replica = self._replica_for(kind) if self.settings.require_replica_success else None
        if replica is None:
            return await _store_blob(self.backend(kind), key, chunks)
        # The replica is copied before the request returns anyway: write it from the body as it
        # arrives, beside the primary, instead of re-reading the primary after the commit.
        staged, copied = await store_with_copy(
            self.backend(kind), key, replica, replica_key(key), chunks
        )
        if copied:
            self._copied.add(key)
        return staged

    async def _commit(self, kind: str, blob_key: str, command: Awaitable[T]) -> T:
        """Run the conditional command that makes an entry name the new blob ``blob_key``.

        Refused for sure: the blob is removed now. Ambiguous (timeout, store trouble, cancel):
        the command may have applied, so the blob stays until the orphan sweep finds it
        unreferenced."""
        try:
            return await command
        except _DEFINITE:
            await self._drop_blob(kind, blob_key)
            if blob_key in self._copied:
                self._copied.discard(blob_key)
                try:
                    await self._delete_replica(blob_key)
                except (CallFSError, OSError):
                    log.warning("could not remove a replica copy; the orphan sweep retries it")
            raise
        except BaseException:
            self._copied.discard(blob_key)  # a replica copy made meanwhile: the sweep decides too
            log.warning("a metadata commit failed ambiguously; the orphan sweep will decide")
            raise

    async def _stage_erasure(
        self,
        path: str,
        chunks: AsyncIterable[bytes],
        data_shards: int,
        parity_shards: int,
        instances: Sequence[str] | None,
    ) -> ErasureLayout:
        """Encode the body into durable shards and record the (not yet referenced) layout."""
        service = self._erasure()
        profile = Profile(data_shards, parity_shards)
        if instances is None:
            others: Sequence[str] = sorted(self.settings.known_instances)
        else:
            self.check_instances(instances)
            others = instances
        holders = placement(
            self.settings.instance_id, others, profile.data_shards + profile.parity_shards
        )
        layout = await service.store(path, chunks, profile, holders)
        try:
            await self._meta.put_erasure(layout)
        except BaseException:
            await service.remove(layout)
            raise
        return layout

    def _erasure_entry(self, owner: str, path: str, layout: ErasureLayout) -> Entry:
        now = self._now()
        return Entry(
            path=path,
            type=EntryType.FILE,
            size=layout.original_size,
            owner=owner,
            mtime=now,
            backend_type=BackendType.ERASURE,
            instance_id=None,
            created_at=now,
            erasure_coded=True,
            blob_key=layout.upload_id,
        )

    async def create_file(
        self,
        who: Identity,
        path: CanonicalPath,
        chunks: AsyncIterable[bytes],
        erasure: ErasureRequest | None = None,
    ) -> Entry:
        """POST of a file: 201 on success; 409 if anything exists at the path."""
        target, parent = await self._lookup(path.path)
        check_write(who, target, parent)
        if target is not None:
            conflict = self._create_conflict(target, want_dir=False)
            assert conflict is not None
            raise conflict
        if parent is not None and not parent.is_dir:
            raise ParentNotDirectory()
        kind = self._default_kind()
        if erasure is not None and self.erasure is not None:
            layout = await self._stage_erasure(
                path.path,
                chunks,
                erasure.data_shards or self.settings.erasure_data_shards,
                erasure.parity_shards or self.settings.erasure_parity_shards,
                erasure.instances,
            )
            entry = self._erasure_entry(who.user_id, path.path, layout)
            blob_key, blob_kind = layout.upload_id, BackendType.ERASURE.value
        else:
            staged = await self._stage(kind, chunks)
            entry = self._file_entry(who.user_id, path.path, kind, staged)
            blob_key, blob_kind = staged.key, kind
        create = self._meta.create
        queued = await self._queue_copy(entry)
        try:
            stored = await self._commit(
                blob_kind,
                blob_key,
                self._locked([path.path], lambda: create(entry, self._parents(who.user_id, kind))),
            )
        except AlreadyExists as exc:
            existing = await self._meta.get(path.path)
            if existing is not None and not isinstance(exc, ParentNotDirectory):
                conflict = self._create_conflict(existing, want_dir=False)
                assert conflict is not None
                raise conflict from exc
            raise
        self._count("create", stored.backend_type.value)
        if not queued:
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
            kind = target.backend_type.value
        else:
            if parent is not None and not parent.is_dir:
                raise ParentNotDirectory()
            kind = self._default_kind()
        if target is not None and target.backend_type is BackendType.ERASURE:
            # §11.6: re-encoded with the same profile under a new upload id, normal placement.
            # Only by a node that takes erasure-coded files: the shards it keeps must be served
            # to the others (its /v1/internal/shards routes exist only with erasure.enabled).
            if not self.settings.erasure_enabled:
                raise BadRequest("erasure coding is not enabled on this node")
            old = await self.erasure_layout(target)
            layout = await self._stage_erasure(
                path.path, chunks, old.data_shards, old.parity_shards, None
            )
            new = self._erasure_entry(who.user_id, path.path, layout)
            blob_key = layout.upload_id
        else:
            staged = await self._stage(kind, chunks)
            new = self._file_entry(who.user_id, path.path, kind, staged)
            blob_key = staged.key

        async def attempt() -> tuple[Entry, Entry | None]:
            current = await self._meta.get(path.path)
            if current is None:
                try:
                    return await self._meta.create(new, self._parents(who.user_id, kind)), None
                except ParentNotDirectory:
                    raise
                except AlreadyExists as exc:
                    raise VersionConflict() from exc  # created meanwhile: decide again
            if current.is_dir:
                raise BadRequest("path is a directory")
            check_write(who, current, None)
            # Normally the same node and backend. If another node (or backend) created the file
            # while our body streamed, last writer wins: this node takes the file over, and the
            # record switches atomically to the bytes just published here.
            updated = replace(new, owner=current.owner, created_at=current.created_at)
            try:
                return await self._meta.update(updated, current.version), current
            except NotFound as exc:
                # deleted or renamed away since the read (another node, worker or request):
                # decide again, as a create now (a review saw these PUTs answer 404)
                raise VersionConflict() from exc

        queued = await self._queue_copy(new)
        stored, replaced = await self._commit(
            kind, blob_key, self._locked([path.path], lambda: self._retrying(attempt))
        )
        self._count("create" if replaced is None else "update", kind)
        if not queued:
            await self._replicate(stored)
        if replaced is not None and replaced.blob_key != stored.blob_key:
            # (the same key: a store that decided again after its own write, which must never
            # cost the bytes just committed)
            await self._reclaim(replaced)
        return stored, replaced is None

    # ---- delete --------------------------------------------------------------------------
    async def delete(self, who: Identity, path: CanonicalPath, recursive: bool) -> None:
        async def attempt() -> list[Entry]:
            target = check_delete(who, await self._meta.get(path.path))
            self._route(target)
            if not target.is_dir:
                return [await self._meta.delete(target.path, target.version)]
            async with self._dir_lock(target.path):
                if recursive:
                    actor = None if who.is_admin else who.user_id
                    return await self._meta.delete_tree(target.path, None, actor)
                if target.path == "/":
                    if await self._meta.has_children("/"):
                        raise DirectoryNotEmpty()
                    return []  # "/" itself is never removed
                return [await self._meta.delete(target.path, target.version)]

        async with self._lock(path.path):
            removed = await self._retrying(attempt)
        for entry in removed:  # deepest first
            if not entry.is_dir:
                self._count("delete", entry.backend_type.value)
            await self._reclaim(entry)

    # ---- reclaiming bytes ----------------------------------------------------------------
    async def _reclaim(self, entry: Entry) -> None:
        """After a commit stopped naming ``entry``'s blob: remove it (and its replica copy).
        Another node's blob is left to that node's orphan sweep; a failure is only logged (§9.8)
        and the sweep retries it."""
        if entry.is_dir or entry.blob_key is None:
            return
        await self._replicate_delete(entry)
        if self.is_remote(entry):
            log.info(
                "a blob on node %s is now unreferenced; its sweep reclaims it", entry.instance_id
            )
            return
        await self._drop_blob(entry.backend_type.value, entry.blob_key)

    async def _drop_blob(self, kind: str, blob_key: str) -> None:
        if kind == BackendType.ERASURE:
            await self._drop_layout(blob_key)
            return
        backend = self._backends.get(kind)
        if backend is None:
            return
        try:
            await backend.delete(blob_key)
        except NotFound:
            return  # already gone: nothing to reclaim
        except (CallFSError, OSError):
            log.warning("could not remove an unreferenced blob; the orphan sweep retries it")

    async def _drop_layout(self, upload_id: str) -> None:
        """An erasure upload no entry names: its shards (best effort), then its layout."""
        try:
            layout = await self._meta.get_erasure(upload_id)
            if layout is None:
                return
            if self.erasure is not None:
                await self.erasure.remove(layout)
            await self._meta.delete_erasure(upload_id)
        except (CallFSError, OSError):
            log.warning("could not remove the shards of an unreferenced erasure upload")

    async def sweep_orphans(self, grace: float = ORPHAN_GRACE) -> int:
        """Remove blobs of this node's backends that no entry names and that are older than
        ``grace`` (a crash between publish and commit, an ambiguous commit, a failed reclaim, a
        blob of this node unreferenced by a change made elsewhere); plus stale staged uploads.
        Returns how many blobs were removed."""
        removed = 0
        for kind, backend in self._backends.items():
            await backend.sweep_temp(grace)
            candidates = await backend.list_blobs(grace)
            for start in range(0, len(candidates), 500):
                batch = candidates[start : start + 500]
                live = await self._meta.blobs_referenced(batch)
                for key in batch:
                    if key not in live:
                        await self._drop_blob(kind, key)
                        removed += 1
        if removed:
            log.info("orphan sweep removed %d unreferenced blobs", removed)
        return removed

    # ---- HA replication (§13) ----------------------------------------------------------
    def _replica_for(self, kind: str) -> StorageBackend | None:
        """The replica backend for bytes kept on the primary backend ``kind`` (None: none)."""
        replica = self.settings.replica_backend
        if not replica or kind in (replica, BackendType.ERASURE):
            return None
        return self.backend(replica)

    def _replicated(self, entry: Entry) -> bool:
        return (
            not entry.is_dir
            and entry.blob_key is not None
            and (self._replica_for(entry.backend_type.value) is not None)
        )

    async def _replica_failed(self, what: str, kind: str, key: str, arg: str) -> None:
        """``require_replica_success``: the request fails (500) though the primary change stands;
        the copy (or removal) is queued as without the option, so the replica catches up once it
        is back instead of staying behind until someone runs ``callfs fsck --repair``."""
        if self._metrics is not None:
            self._metrics.errors.labels("replication", what).inc()
        log.error("replica %s failed; the primary change stands, the work is queued", what)
        try:
            await self._enqueue(kind, key, arg)
        except CallFSError:
            log.error("replica %s could not be queued either; callfs fsck --repair finds it", what)
        raise InternalError()

    async def _enqueue(self, kind: str, key: str, arg: str) -> None:
        if self._queue is None:
            log.error("replication is on but the node has no work queue")
            raise InternalError()
        await self._queue.enqueue(kind, key, arg, self._clock())
        if self.on_work_queued is not None:
            self.on_work_queued()

    async def _queue_copy(self, entry: Entry) -> bool:
        """Asynchronous replication: queue the copy of a new version BEFORE the command that
        commits it (True if queued). Queued after it, a kill -9 between the two left a committed
        version that nobody would copy (found by review). If the commit does not happen, the
        worker finds the blob gone, or copies a blob that the orphan sweeps then remove."""
        if self.settings.require_replica_success or not self._replicated(entry):
            return False
        assert entry.blob_key is not None
        await self._enqueue(REPLICA_PUT, entry.blob_key, _copy_arg(entry))
        return True

    async def _replicate(self, stored: Entry) -> None:
        """After a create or update: copy the new version now (``require_replica_success``) or
        queue the copy durably for the worker. The replaced version's copy goes in ``_reclaim``."""
        if not self._replicated(stored):
            return
        assert stored.blob_key is not None
        if stored.blob_key in self._copied:
            self._copied.discard(stored.blob_key)
            return  # copied while the body streamed (``_stage``)
        arg = _copy_arg(stored)
        if not self.settings.require_replica_success:
            await self._enqueue(REPLICA_PUT, stored.blob_key, arg)
            return
        try:
            await self._copy_to_replica(stored)
        except (CallFSError, OSError):
            await self._replica_failed("put", REPLICA_PUT, stored.blob_key, arg)

    async def _replicate_delete(self, entry: Entry) -> None:
        if not self._replicated(entry):
            return
        assert entry.blob_key is not None
        if not self.settings.require_replica_success:
            # the replica it is on: a node writing another one hands the item back
            await self._enqueue(REPLICA_DELETE, entry.blob_key, self.settings.replica_backend or "")
            return
        try:
            await self._delete_replica(entry.blob_key)
        except (CallFSError, OSError):
            await self._replica_failed(
                "delete", REPLICA_DELETE, entry.blob_key, self.settings.replica_backend or ""
            )

    async def _copy_to_replica(self, source: Entry) -> None:
        replica = self._replica_for(source.backend_type.value)
        if replica is None or source.blob_key is None:
            return
        stream = await self._open(source, 0, None)
        await _copy_into(replica, replica_key(source.blob_key), stream)

    async def _delete_replica(self, blob_key: str) -> None:
        kind = self.settings.replica_backend
        if kind:
            with suppress(NotFound):
                await self.backend(kind).delete(replica_key(blob_key))

    async def apply_work(self, item: WorkItem) -> None:
        """Carry out one WorkQueue item. Idempotent: blobs are immutable, so a copy made twice
        is the same copy, and a blob already gone needs no copy."""
        replica_kind = self.settings.replica_backend
        if item.kind == REPLICA_DELETE:
            # ``arg``: the replica the copy is on ("" in items of an earlier version)
            if not replica_kind or (item.arg and item.arg != replica_kind):
                raise WorkElsewhere(
                    "the copy is on a replica this node does not write", hopeless=not replica_kind
                )
            await self._delete_replica(item.key)
            return
        if item.kind != REPLICA_PUT:
            log.warning("unknown work item kind %r dropped", item.kind)
            return
        kind, instance, path = item.arg.split("\t", 2)
        mine = not instance or instance == self.settings.instance_id
        replica = self._replica_for(kind)
        if replica is None:
            # a node without replication (a rolling change of ``ha``) or with another replica
            raise WorkElsewhere(
                f"no replica for {kind} bytes on this node", hopeless=not replica_kind
            )
        source = await self._meta.get(path)
        if source is not None and source.blob_key == item.key:
            with suppress(NotFound):  # replaced meanwhile: that change has its own items
                await self._copy_to_replica(source)  # another node's bytes through that node
            return
        # Renamed, replaced or deleted since: copy the blob while it still exists.
        if not mine:
            raise WorkElsewhere(
                "another node's blob, no longer named by its path",
                hopeless=not self.known_instance(instance),  # drained and removed
            )
        try:
            stream = await self.backend(kind).open_read(item.key)
        except NotFound:
            return  # reclaimed already: its delete item removes any copy
        await _copy_into(replica, replica_key(item.key), stream)

    # ---- move ----------------------------------------------------------------------------
    async def move(self, who: Identity, src: CanonicalPath, req: MoveRequest) -> str:
        """PATCH (§9.7): rename or move a file or directory tree; returns the new engine path."""
        # Decided on fresh reads; the locks cover only the commit (``_locked``): a move to
        # another backend or node copies the bytes first, under a new key, and its command is
        # conditional on the source's version (a change meanwhile: copied again).
        moved, old, occupant, queued = await self._retrying(
            lambda: self._move_once(who, src, req), tries=_MOVE_TRIES
        )
        if occupant is not None:
            await self._reclaim(occupant)
        if moved.blob_key != old.blob_key:
            await self._reclaim(old)
            if not queued:
                await self._replicate(moved)
        self._count("rename", moved.backend_type.value)
        return req.destination.path

    async def _move_once(
        self, who: Identity, src: CanonicalPath, req: MoveRequest
    ) -> tuple[Entry, Entry, Entry | None, bool]:
        """One decision and commit: (the moved entry, the source, a replaced occupant, whether
        the new blob's replica copy is queued already)."""
        source = check_delete(who, await self._meta.get(src.path))
        dst = req.destination.path
        dst_entry, dst_parent = await self._lookup(dst)
        check_write(who, dst_entry, dst_parent)

        kind = req.backend if req.backend is not None else source.backend_type.value
        instance = req.instance
        if src.path == "/" or dst == "/":
            raise BadRequest("cannot move the root directory")
        if kind not in (b.value for b in BackendType):
            raise BadRequest("backend must be one of: localfs, s3, erasure")
        if instance is not None and not self.known_instance(instance):
            raise BadRequest("unknown instance")
        changes_backend = kind != source.backend_type.value
        changes_instance = instance is not None and instance != (
            source.instance_id or self.settings.instance_id
        )
        if dst == src.path and not changes_backend and not changes_instance:
            raise BadRequest("destination equals source")
        if dst.startswith(src.path + "/"):
            raise BadRequest("cannot move a directory into itself")
        if dst_parent is None and not req.create_parents and dst != src.path:
            raise BadRequest("destination parent does not exist")
        if source.is_dir and (changes_backend or changes_instance):
            raise BadRequest("a directory cannot change backend or instance")
        if changes_backend and BackendType.ERASURE in (source.backend_type, kind):
            raise BadRequest("cannot move to or from the erasure backend")
        if changes_instance and kind != BackendType.LOCALFS:
            raise BadRequest("only localfs items have an owner node")
        if not changes_backend or changes_instance:
            self._route(source)  # the owner node moves its bytes (the API layer proxies there)

        dst_expected: int | None = None
        if dst_entry is not None and dst != src.path:
            if not req.overwrite:
                raise AlreadyExists("destination already exists")
            if dst_entry.is_dir != source.is_dir:
                raise AlreadyExists("destination exists with another type")
            if dst_entry.is_dir and await self._meta.has_children(dst):
                raise DirectoryNotEmpty()
            # no delete check on the occupant: PATCH needs write on the destination (API.md §5;
            # someone else's file refuses that write, someone else's directory allows it)
            if source.backend_type is not BackendType.LOCALFS:
                # no owner node of its own: the occupant's owner replaces it (and reclaims its
                # blob at once). A localfs source is moved by its owner, this node by now: an
                # occupant's blob on another node goes to that node's orphan sweep (sending the
                # PATCH there would send it straight back here, and so on)
                self._route(dst_entry)
            dst_expected = dst_entry.version

        parents = None
        if req.create_parents:
            parents = self._parents(source.owner, source.backend_type.value)
        if changes_instance:
            assert instance is not None
            return await self._move_to_node(source, dst, instance, dst_expected, parents)
        if not changes_backend:
            try:
                moved, occupant = await self._switch(source, dst, dst_expected, parents)
            except ParentMissing as exc:
                raise BadRequest("destination parent does not exist") from exc
            return moved, source, occupant, False
        # Another backend on this node: copy into a new blob there, then switch the placement
        # record (and the path) in one command; the source bytes go only after that commit.
        self._route(source)
        assert source.blob_key is not None
        stream = await self._open(source, 0, None)
        staged_key = new_blob_key()
        size = await _copy_into(self.backend(kind), staged_key, stream)
        placement = Placement(BackendType(kind), self._instance_for(kind), staged_key, size)
        try:
            queued = await self._queue_move_copy(source, dst, placement)
        except CallFSError:
            await self._drop_blob(kind, staged_key)  # nothing names it: the move failed
            raise
        moved, occupant = await self._commit(
            kind, staged_key, self._switch(source, dst, dst_expected, parents, placement)
        )
        return moved, source, occupant, queued

    async def _queue_move_copy(self, source: Entry, dst: str, placement: Placement) -> bool:
        """A move that switches the bytes to a new blob queues that blob's replica copy before
        its command, as a create does (``_queue_copy``): queued after the commit, a kill -9
        between the two left the moved file without a replica copy (found by review)."""
        return await self._queue_copy(
            replace(
                source,
                path=dst,
                backend_type=placement.backend_type,
                instance_id=placement.instance_id,
                blob_key=placement.blob_key,
            )
        )

    async def _switch(
        self,
        source: Entry,
        dst: str,
        dst_expected: int | None,
        parents: NewParents | None,
        placement: Placement | None = None,
    ) -> tuple[Entry, Entry | None]:
        """A move's one conditional command (on the source's version and the destination's),
        under the locks of both paths; with ``placement``, it also switches the bytes."""
        return await self._locked(
            (source.path, dst),
            lambda: self._meta.move(
                source.path,
                dst,
                expected_version=source.version,
                dst_expected=dst_expected,
                parents=parents,
                placement=placement,
            ),
        )

    # ---- moves between nodes (issue 14) ----------------------------------------------------
    def check_instances(self, instances: Sequence[str]) -> None:
        """400 for a named node this one does not know (one joined at run time is known); the
        API asks before authorization, as §8 orders the checks."""
        for node in instances:
            if not self.known_instance(node):
                raise BadRequest(f"unknown instance {node!r}")

    def known_instance(self, instance: str) -> bool:
        """This node, a configured peer, or a node the peer client can resolve (a Raft member)."""
        return (
            instance == self.settings.instance_id
            or instance in self.settings.known_instances
            or (self.peers is not None and self.peers.endpoint(instance) is not None)
        )

    def _peer_client(self) -> PeerClient:
        if self.peers is None:
            raise PeerUnavailable("this node has no inter-node client")
        return self.peers

    async def _move_to_node(
        self,
        source: Entry,
        dst: str,
        target: str,
        dst_expected: int | None,
        parents: NewParents | None,
    ) -> tuple[Entry, Entry, Entry | None, bool]:
        """Another owner node: stream the bytes to ``target``, which makes them durable under a
        NEW blob key of its own; then ONE conditional command switches the placement record (and
        the path, for a rename) to that blob. ``move`` removes the source bytes after the commit.

        A failure before the commit changes nothing (the target discards a partial upload). A
        refused commit removes the target's blob at once; an ambiguous one leaves it, unnamed, to
        the target's orphan sweep. Either way one whole copy stays readable through the record."""
        peers = self._peer_client()
        if source.blob_key is None:
            raise NotFound()
        stream = await self._open(source, 0, None)
        try:
            key = await peers.push_blob(target, _iterate(stream), source.size)
        finally:
            await stream.aclose()
        placement = Placement(BackendType.LOCALFS, target, key, source.size)
        try:
            queued = await self._queue_move_copy(source, dst, placement)
        except CallFSError:
            await peers.drop_blob(target, key)  # nothing names it: the move failed
            raise
        try:
            moved, occupant = await self._switch(source, dst, dst_expected, parents, placement)
        except _DEFINITE as exc:
            await peers.drop_blob(target, key)
            if isinstance(exc, ParentMissing):
                raise BadRequest("destination parent does not exist") from exc
            raise
        except BaseException:
            log.warning("a move commit failed ambiguously; the sweep of %s will decide", target)
            raise
        if self._metrics is not None:
            self._metrics.node_moves_files.labels("patch").inc()
            self._metrics.node_moves_bytes.labels("patch").inc(source.size)
        return moved, source, occupant, queued

    async def receive_blob(self, chunks: AsyncIterable[bytes], size: int) -> str:
        """The target side of a move between nodes: store another node's file bytes durably in
        this node's localfs under a NEW blob key (returned). Nothing names the blob until the
        mover commits; if it never does, the orphan sweep removes it. A body that does not
        have exactly ``size`` bytes (the sender failed) is discarded: ``BadRequest``."""
        staged = await self.backend(BackendType.LOCALFS).stage(new_blob_key(), chunks)
        try:
            if staged.size != size:
                raise BadRequest(f"expected {size} bytes, received {staged.size}")
            await staged.publish()
        except BaseException:
            await staged.discard()
            raise
        return staged.key

    async def drop_unnamed_blob(self, key: str) -> bool:
        """Remove a localfs blob of this node that no entry names (a move whose commit was
        refused); False, keeping it, if an entry names it."""
        if not is_blob_key(key) or await self._meta.blobs_referenced([key]):
            return False
        await self._drop_blob(BackendType.LOCALFS.value, key)
        return True

    async def relocate(self, who: Identity, entry: Entry, target: str) -> None:
        """Move the file ``entry`` (same path) to the owner node ``target``: here if this node
        owns it, else through its owner (a PATCH with the internal secret)."""
        owner = entry.instance_id
        if owner is None or owner == self.settings.instance_id:
            path = CanonicalPath(entry.path)
            try:
                await self.move(who, path, MoveRequest(destination=path, instance=target))
                return
            except RemoteOwner as exc:  # taken over by another node since it was listed
                owner = exc.instance_id
        try:
            await self._peer_client().relocate(owner, entry.path, target, entry.size)
        except NotFound:
            now = await self._meta.get(entry.path)
            if now is not None and now.blob_key == entry.blob_key and now.instance_id == owner:
                # the record is still there, unchanged: the owner has no whole bytes for it
                raise BlobDamaged(
                    f"the file's bytes are missing or incomplete on {owner}"
                ) from None
            raise  # deleted or moved meanwhile

    async def retag_directory(self, entry: Entry, target: str) -> None:
        """The directory record ``entry`` names ``target`` as its owner node from now on:
        metadata only, one conditional placement switch. ``NotFound`` if it was deleted
        meanwhile; a ``CallFSError`` (a version conflict) if it changed."""
        retag = Placement(entry.backend_type, target, None, 0)
        await self._meta.move(
            entry.path, entry.path, expected_version=entry.version, placement=retag
        )

    async def relocate_tree(self, who: Identity, path: CanonicalPath, target: str) -> TreeMove:
        """PATCH ``{"instance": ...}`` on a directory: every localfs file below it moves to
        ``target``, each with its own placement switch (``relocate``), then the directory and
        those below it name ``target`` as their owner node (metadata only, one conditional switch
        each, as a drain re-tags them). Permission is checked for
        the whole tree first (nothing moves if a file may not be moved); an unreachable target
        changes nothing. Files already there, S3 and erasure-coded files are skipped; a file
        that fails is reported and the others still move (re-running continues)."""
        directory = check_delete(who, await self._meta.get(path.path))  # before 400s (§9.7)
        if not self.known_instance(target):
            raise BadRequest("unknown instance")
        if not directory.is_dir:
            raise BadRequest("path is not a directory")
        entries = await self._meta.list_tree(directory.path, 1 << 30)
        files = [e for e in entries if not e.is_dir]
        for entry in files:
            check_delete(who, entry)
        if all(
            e.instance_id == target or e.backend_type is not BackendType.LOCALFS
            for e in (directory, *entries)
        ):
            # §9.7 step 5: neither the path nor where anything lives would change
            raise BadRequest("destination equals source")
        if target != self.settings.instance_id and not await self._peer_client().alive(target):
            raise PeerUnavailable("target node unreachable")
        report = TreeMove()
        tree = [directory, *(e for e in entries if e.is_dir)]
        for entry in files:
            if entry.backend_type is not BackendType.LOCALFS or entry.instance_id == target:
                report.skipped += 1
                continue
            try:
                await self.relocate(who, entry, target)
            except NotFound:
                report.skipped += 1  # deleted meanwhile
                continue
            except CallFSError as exc:
                log.warning(
                    "could not move %s to %s: %s", shown_path(entry.path), target, exc.message
                )
                report.failed.append(entry.path)
                continue
            report.moved_files += 1
            report.moved_bytes += entry.size
        for entry in tree:  # then the directories: renames and deletes of them go to the target
            if entry.instance_id == target:
                continue
            try:
                await self.retag_directory(entry, target)
            except NotFound:
                continue  # deleted meanwhile
            except CallFSError as exc:  # changed meanwhile: re-running the PATCH re-tags it
                log.warning(
                    "could not re-tag %s to %s: %s", shown_path(entry.path), target, exc.message
                )
                report.failed.append(entry.path + "/")
                continue
            report.moved_dirs += 1
        return report


async def _store_blob(
    backend: StorageBackend, key: str, chunks: AsyncIterable[Chunk]
) -> StagedObject:
    """Stream ``chunks`` into ``backend`` under ``key`` and publish it (durable and readable);
    the staged object is discarded if publishing fails."""
    return await publish_or_discard(await backend.stage(key, chunks))


async def _copy_into(backend: StorageBackend, key: str, stream: ByteStream) -> int:
    """Copy an open read into ``backend`` under ``key``; returns the size written. The stream is
    always closed."""
    try:
        staged = await _store_blob(backend, key, _iterate(stream))
    finally:
        await stream.aclose()
    return staged.size


async def _iterate(stream: ByteStream) -> AsyncIterable[Chunk]:
    async for chunk in stream:
        yield chunk
