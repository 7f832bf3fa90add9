"""``callfs fsck``: do the namespace and the bytes of every node still agree?

Two halves, because only a node can see its own disk:

- **Each node, its own bytes** (``scan_local``): it pages through what its backends hold
  (``StorageBackend.list_keys``: blobs, replica copies, erasure shards, staged temp files) and
  asks the metadata store, in batches, which of those keys a committed entry names
  (``blobs_referenced``; an erasure shard is named through its upload id and the layout). What no
  record names and is older than the grace is an ``orphan``; a temp file older than the grace is
  ``stale-temp``. With ``repair`` each one is removed, the reference re-checked right before the
  delete. The periodic orphan sweep of every node is this same pass with ``repair`` (``sweep``).
  Since it lists every key with its size anyway, it also records what the node's local disk holds
  (``callfs_stored_bytes`` / ``callfs_stored_files`` per area, the cluster page's bytes per
  node); ``count_stored`` is the same listing alone, run once in the background at start.
- **One node, the records** (``run``, the node asked by ``callfs fsck``): it asks every node
  (itself included) for its own findings, then walks the namespace a page at a time
  (``list_children_page``) and asks each record's holder, in batches, for the size of the bytes
  the record names: absent is ``missing``, another size is ``size-mismatch`` (a localfs blob on
  its owner node, an S3 blob, each erasure shard on its holder, the HA replica copy). Neither is
  repaired by deleting anything; a missing replica copy is queued for replication again.

Nothing a committed record points to is ever deleted: every delete re-asks the store first, and
only keys older than the grace are candidates (a write between publish and commit is younger).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp

from callfs.core.engine import ORPHAN_GRACE, REPLICA_PUT, Engine, replica_key
from callfs.core.peer import PeerClient
from callfs.errors import CallFSError, NotFound, UnsafePath
from callfs.jobs.base import WorkQueue
from callfs.metadata.base import ChildPosition, MetadataStore
from callfs.metrics import Metrics
from callfs.model import BackendType, Entry, ErasureLayout
from callfs.storage.base import (
    AREA_BLOBS,
    AREA_REPLICAS,
    AREA_SHARDS,
    AREA_TEMP,
    REPLICA_PREFIX,
    SHARD_PREFIX,
    StorageBackend,
    StoredObject,
    is_blob_key,
)

log = logging.getLogger(__name__)

ORPHAN = "orphan"
MISSING = "missing"
SIZE_MISMATCH = "size-mismatch"
STALE_TEMP = "stale-temp"
KINDS = (ORPHAN, MISSING, SIZE_MISMATCH, STALE_TEMP)
#: Keys listed, referenced-checked and stat'ed per round trip.
PAGE = 1000
#: Entries read per ``list_children_page`` call of the namespace walk.
WALK_PAGE = 1000
#: Stats a node runs at once for a ``stat`` batch.
STAT_CONCURRENCY = 32
#: How long the coordinator waits for one node's answer (a big disk takes a while to list).
NODE_TIMEOUT = 6 * 3600.0
#: ``stat`` requests name this pseudo-backend for erasure shards (the node's shard backend).
SHARDS = "shards"
#: The localfs areas counted as what a node stores (staged temp files are not).
STORED_AREAS = (AREA_BLOBS, AREA_REPLICAS, AREA_SHARDS)
_PEER_ERRORS = (aiohttp.ClientError, TimeoutError, OSError, ValueError)


@dataclass(slots=True)
class Finding:
    kind: str
    node: str
    backend: str
    area: str
    key: str
    path: str | None = None
    size: int | None = None
    expected_size: int | None = None
    age: float | None = None
    detail: str = ""
    repaired: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class LocalReport:
    """What one node found on its own backends."""

    node: str
    findings: list[Finding] = field(default_factory=list)
    #: Objects listed per ``backend/area``.
    scanned: dict[str, int] = field(default_factory=dict)
    #: Bytes of the objects listed per ``backend/area`` (recorded in metrics, not sent).
    scanned_bytes: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "scanned": self.scanned,
            "findings": [f.as_dict() for f in self.findings],
        }


def _finding(raw: dict[str, Any]) -> Finding:
    names = Finding.__dataclass_fields__
    return Finding(**{k: v for k, v in raw.items() if k in names})


class Fsck:
    def __init__(
        self,
        engine: Engine,
        meta: MetadataStore,
        backends: dict[str, StorageBackend],
        shard_backend: StorageBackend | None,
        peers: PeerClient | None,
        peer_ids: Callable[[], Sequence[str]],
        queue: WorkQueue | None = None,
        clock: Callable[[], float] = time.time,
        metrics: Metrics | None = None,
    ) -> None:
        self._engine = engine
        self._meta = meta
        self._backends = backends
        self._shards = shard_backend
        self._peers = peers
        self._peer_ids = peer_ids
        self._queue = queue
        self._clock = clock
        self._metrics = metrics
        self.instance_id = engine.settings.instance_id
        self._running = asyncio.Lock()

    # ==== one node, its own bytes ===============================================================
    async def sweep(self, grace: float = ORPHAN_GRACE) -> int:
        """The periodic sweep: remove this node's orphans and stale temp files older than
        ``grace`` (blobs, replica copies, erasure shards; S3 too). Returns how many went."""
        report = await self.scan_local(repair=True, grace=grace, shared=True, layouts=False)
        removed = sum(1 for f in report.findings if f.repaired)
        if removed:
            log.info("orphan sweep removed %d unreferenced objects", removed)
        return removed

    async def scan_local(
        self, repair: bool, grace: float, shared: bool = True, layouts: bool = True
    ) -> LocalReport:
        """This node's findings on its own backends. ``shared``: include the backends every node
        sees alike (S3), which one node of a cluster-wide fsck checks for all. ``layouts``: also
        read the layout of every named upload this node holds shards of, to find shards a
        repair moved elsewhere (one store read per upload: fsck does it, the periodic sweep
        does not)."""
        report = LocalReport(self.instance_id)
        for kind, backend in sorted(self._backends.items()):
            if kind != BackendType.LOCALFS and not shared:
                continue
            await self._scan_blobs(report, kind, backend, AREA_BLOBS, repair, grace)
            await self._scan_blobs(report, kind, backend, AREA_REPLICAS, repair, grace)
            if backend is self._shards:
                await self._scan_shards(report, kind, backend, repair, grace, layouts)
            await self._scan_temp(report, kind, backend, repair, grace)
            if kind == BackendType.LOCALFS:
                self._record_stored(report)
        return report

    async def count_stored(self) -> None:
        """List this node's local disk (the areas ``scan_local`` lists, nothing else) and record
        what it holds; no metadata store call. Without a localfs backend it holds nothing."""
        report = LocalReport(self.instance_id)
        backend = self._backends.get(BackendType.LOCALFS)
        if backend is not None:
            for area in STORED_AREAS:
                if area == AREA_SHARDS and backend is not self._shards:
                    continue
                async for _ in self._pages(report, BackendType.LOCALFS, backend, area):
                    pass
        self._record_stored(report)

    def _record_stored(self, report: LocalReport) -> None:
        """Set the stored-bytes gauges from a complete listing of the localfs areas, less what
        the same pass removed."""
        if self._metrics is None:
            return
        for area in STORED_AREAS:
            scanned = f"{BackendType.LOCALFS}/{area}"
            gone = [
                f
                for f in report.findings
                if f.repaired and f.backend == BackendType.LOCALFS and f.area == area
            ]
            files = report.scanned.get(scanned, 0) - len(gone)
            size = report.scanned_bytes.get(scanned, 0) - sum(f.size or 0 for f in gone)
            self._metrics.stored_files.labels(area).set(max(files, 0))
            self._metrics.stored_bytes.labels(area).set(max(size, 0))

    async def _pages(
        self, report: LocalReport, kind: str, backend: StorageBackend, area: str
    ) -> AsyncIterator[list[StoredObject]]:
        after = ""
        while True:
            page = await backend.list_keys(area, after, PAGE)
            scanned = f"{kind}/{area}"
            report.scanned[scanned] = report.scanned.get(scanned, 0) + len(page)
            size = sum(o.size for o in page)
            report.scanned_bytes[scanned] = report.scanned_bytes.get(scanned, 0) + size
            if page:
                yield page
            if len(page) < PAGE:
                return
            after = page[-1].key

    async def _scan_blobs(
        self,
        report: LocalReport,
        kind: str,
        backend: StorageBackend,
        area: str,
        repair: bool,
        grace: float,
    ) -> None:
        """Blobs (or replica copies) no entry names as its blob key, older than ``grace``."""
        now = self._clock()
        async for page in self._pages(report, kind, backend, area):
            old = [o for o in page if now - o.mtime >= grace]
            if not old:
                continue
            blob_of = {o.key: o.key.removeprefix(REPLICA_PREFIX) for o in old}
            live = await self._meta.blobs_referenced(sorted(set(blob_of.values())))
            for obj in old:
                if blob_of[obj.key] in live:
                    continue
                found = self._local_finding(ORPHAN, kind, area, obj, now)
                found.detail = "no entry names this blob"
                report.findings.append(found)
                if repair:
                    found.repaired = await self._remove_unreferenced(backend, obj.key, blob_of)

    async def _remove_unreferenced(
        self, backend: StorageBackend, key: str, blob_of: dict[str, str]
    ) -> bool:
        """Delete ``key`` if, asked again now, no entry names its blob."""
        if await self._meta.blobs_referenced([blob_of[key]]):
            return False
        try:
            await backend.delete(key)
        except NotFound:
            return True
        except (CallFSError, OSError) as exc:
            log.warning("fsck could not remove %s: %s", key, exc)
            return False
        return True

    async def _scan_shards(
        self,
        report: LocalReport,
        kind: str,
        backend: StorageBackend,
        repair: bool,
        grace: float,
        layouts: bool,
    ) -> None:
        """Shards of uploads no entry names, and shards a layout places on another node (left
        behind by a repair that moved them), older than ``grace``."""
        now = self._clock()
        async for page in self._pages(report, kind, backend, AREA_SHARDS):
            by_upload: dict[str, list[StoredObject]] = defaultdict(list)
            for obj in page:
                if now - obj.mtime >= grace:
                    by_upload[_upload_of(obj.key)].append(obj)
            if not by_upload:
                continue
            live = await self._meta.blobs_referenced(sorted(by_upload))
            for upload, objs in by_upload.items():
                if upload in live:
                    if not layouts:
                        continue
                    mine = await self._held_here(upload, kind)
                    if mine is None:
                        continue  # named but no layout: fsck reports it as missing
                    stray = [o for o in objs if _index_of(o.key) not in mine]
                    detail = "the layout places this shard on another node"
                else:
                    stray, detail = objs, "no entry names this erasure upload"
                for obj in stray:
                    found = self._local_finding(ORPHAN, kind, AREA_SHARDS, obj, now)
                    found.detail = detail
                    report.findings.append(found)
                    if repair:
                        found.repaired = await self._remove_shard(backend, kind, upload, obj.key)
                if repair and upload not in live:
                    await self._forget_layout(upload)

    async def _held_here(self, upload: str, kind: str) -> set[int] | None:
        """The shard indices of ``upload`` that ``kind``'s storage of this node should hold
        (None: no layout). An S3 bucket is shared by the nodes that keep their shards there
        (``erasure.shard_backend: s3``), under keys that do not name the node: there every shard
        the layout names is in place, whichever node serves it (each was reported as stray,
        and ``--repair`` removed the shards of every other node; found by audit)."""
        layout = await self._meta.get_erasure(upload)
        if layout is None:
            return None
        if kind == BackendType.S3.value:
            return {s.index for s in layout.shards}
        return {s.index for s in layout.shards if s.instance_id == self.instance_id}

    async def _remove_shard(
        self, backend: StorageBackend, kind: str, upload: str, key: str
    ) -> bool:
        """Delete a shard if, asked again now, its upload is unreferenced or the layout does not
        place it here."""
        if await self._meta.blobs_referenced([upload]):
            mine = await self._held_here(upload, kind)
            if mine is None or _index_of(key) in mine:
                return False
        try:
            await backend.delete(key)
        except NotFound:
            return True
        except (CallFSError, OSError) as exc:
            log.warning("fsck could not remove shard %s: %s", key, exc)
            return False
        return True

    async def _forget_layout(self, upload: str) -> None:
        """The layout of an upload no entry names (its shards on other nodes are their nodes'
        orphans)."""
        try:
            if not await self._meta.blobs_referenced([upload]):
                await self._meta.delete_erasure(upload)
        except (CallFSError, OSError) as exc:
            log.warning("fsck could not remove an unreferenced erasure layout: %s", exc)

    async def _scan_temp(
        self, report: LocalReport, kind: str, backend: StorageBackend, repair: bool, grace: float
    ) -> None:
        now = self._clock()
        stale: list[Finding] = []
        async for page in self._pages(report, kind, backend, AREA_TEMP):
            for obj in page:
                if now - obj.mtime >= grace:
                    found = self._local_finding(STALE_TEMP, kind, AREA_TEMP, obj, now)
                    found.detail = "staged upload never published"
                    stale.append(found)
        report.findings.extend(stale)
        if repair and stale:
            await backend.sweep_temp(grace)
            again = LocalReport(self.instance_id)  # not counted twice in ``scanned``
            left = {
                o.key async for page in self._pages(again, kind, backend, AREA_TEMP) for o in page
            }
            for found in stale:
                found.repaired = found.key not in left

    def _local_finding(
        self, what: str, kind: str, area: str, obj: StoredObject, now: float
    ) -> Finding:
        return Finding(
            kind=what,
            node=self.instance_id,
            backend=kind,
            area=area,
            key=obj.key,
            size=obj.size,
            age=round(now - obj.mtime, 1),
        )

    async def stat_keys(self, items: Sequence[tuple[str, str]]) -> list[int | None]:
        """The size of each ``(backend, key)`` on this node (None: nothing there). ``backend``
        ``shards`` is the node's shard backend."""
        gate = asyncio.Semaphore(STAT_CONCURRENCY)

        async def one(kind: str, key: str) -> int | None:
            backend = self._shards if kind == SHARDS else self._backends.get(kind)
            if backend is None:
                return None
            async with gate:
                try:
                    found = await backend.stat(key)
                except (NotFound, UnsafePath):
                    return None
            return None if found is None or found.is_dir else found.size

        return list(await asyncio.gather(*(one(k, key) for k, key in items)))

    # ==== the whole cluster =====================================================================
    async def run(self, repair: bool = False, grace: float = ORPHAN_GRACE) -> dict[str, Any]:
        """Every node's own findings, then the namespace walk; the report ``callfs fsck`` prints."""
        async with self._running:
            return await self._run(repair, grace)

    async def _run(self, repair: bool, grace: float) -> dict[str, Any]:
        started = time.monotonic()
        nodes = sorted({self.instance_id, *self._peer_ids()})
        errors: list[dict[str, str]] = []
        findings: list[Finding] = []
        answers = await asyncio.gather(*(self._ask_local(n, repair, grace) for n in nodes))
        node_info: dict[str, Any] = {}
        for node, answer in zip(nodes, answers, strict=True):
            if isinstance(answer, str):
                errors.append({"node": node, "error": answer})
                node_info[node] = {"reachable": False}
                continue
            findings.extend(answer.findings)
            node_info[node] = {"reachable": True, "scanned": answer.scanned}
        walk = _Walk(self, repair, grace, errors)
        checked = await walk.run()
        findings.extend(walk.findings)
        counts = {k: sum(1 for f in findings if f.kind == k) for k in KINDS}
        repaired = sum(1 for f in findings if f.repaired)
        return {
            "coordinator": self.instance_id,
            "repair": repair,
            "grace": grace,
            "nodes": node_info,
            "entries_checked": checked,
            "counts": counts,
            "repaired": repaired,
            "unrepaired": len(findings) - repaired,
            "findings": [f.as_dict() for f in findings],
            "errors": errors,
            "clean": not errors and repaired == len(findings),
            "elapsed": round(time.monotonic() - started, 3),
        }

    async def _ask_local(self, node: str, repair: bool, grace: float) -> LocalReport | str:
        shared = node == self.instance_id
        if shared:
            try:
                return await self.scan_local(repair, grace, shared=True)
            except CallFSError as exc:
                return f"scan failed: {exc.message}"
            except OSError as exc:  # its text names the server path: the reason only (audit)
                return f"scan failed: {exc.strerror or type(exc).__name__}"
        body = {"repair": repair, "grace": grace, "shared": False}
        answer = await self._post(node, "/v1/internal/fsck/local", body)
        if isinstance(answer, str):
            return answer
        report = LocalReport(str(answer.get("node") or node), scanned=answer.get("scanned", {}))
        report.findings = [_finding(f) for f in answer.get("findings", [])]
        return report

    async def _post(self, node: str, path: str, body: dict[str, Any]) -> dict[str, Any] | str:
        """One internal call to a peer; an error string when it cannot be asked."""
        base = self._peers.endpoint(node) if self._peers is not None else None
        if self._peers is None or base is None:
            return "no endpoint known for this node"
        try:
            async with self._peers.session.post(
                base.rstrip("/") + path,
                json=body,
                headers=self._peers.auth_headers(),
                timeout=aiohttp.ClientTimeout(total=NODE_TIMEOUT),
            ) as resp:
                if resp.status != 200:
                    return f"answered HTTP {resp.status}: {(await resp.text())[:200]}"
                answer = await resp.json()
        except (*_PEER_ERRORS, CallFSError) as exc:
            return f"unreachable: {type(exc).__name__}: {exc}"
        return answer if isinstance(answer, dict) else "answered something else than an object"

    async def stat_on(self, node: str, items: Sequence[tuple[str, str]]) -> list[int | None] | str:
        if node == self.instance_id:
            return await self.stat_keys(items)
        answer = await self._post(
            node, "/v1/internal/fsck/stat", {"items": [list(i) for i in items]}
        )
        if isinstance(answer, str):
            return answer
        sizes = answer.get("sizes")
        if not isinstance(sizes, list) or len(sizes) != len(items):
            return "answered a malformed stat batch"
        return [s if isinstance(s, int) else None for s in sizes]

    async def requeue_replica(self, entry: Entry) -> bool:
        """Queue the HA copy of ``entry``'s blob again (the worker's ``REPLICA_PUT`` item, as
        ``Engine._replicate`` queues it)."""
        if self._queue is None or entry.blob_key is None:
            return False
        arg = f"{entry.backend_type.value}\t{entry.instance_id or ''}\t{entry.path}"
        await self._queue.enqueue(REPLICA_PUT, entry.blob_key, arg, self._clock())
        if self._engine.on_work_queued is not None:
            self._engine.on_work_queued()
        return True

    async def current(self, path: str) -> Entry | None:
        return await self._meta.get(path)

    async def layout_of(self, entry: Entry) -> ErasureLayout | None:
        return await self._meta.get_erasure(entry.blob_key or entry.path)

    async def children(self, path: str, after: ChildPosition | None) -> list[Entry]:
        return await self._meta.list_children_page(path, after, WALK_PAGE)

    def has_backend(self, kind: str) -> bool:
        return kind in self._backends

    def now(self) -> float:
        return self._clock()

    @property
    def replica_kind(self) -> str | None:
        return self._engine.settings.replica_backend


@dataclass(slots=True)
class _Check:
    """One expectation: ``key`` on ``backend`` of ``node`` holds ``size`` bytes."""

    entry: Entry
    backend: str
    key: str
    size: int
    area: str
    replica: bool = False


class _Walk:
    """The namespace walk of ``Fsck.run``: a page of entries at a time, the expected bytes
    batched per holder node."""

    def __init__(
        self, fsck: Fsck, repair: bool, grace: float, errors: list[dict[str, str]]
    ) -> None:
        self._fsck = fsck
        self._repair = repair
        self._grace = grace
        self._errors = errors
        self.findings: list[Finding] = []
        self._pending: dict[str, list[_Check]] = defaultdict(list)
        self._unchecked: dict[str, int] = defaultdict(int)
        self._failed: dict[str, str] = {}

    async def run(self) -> int:
        checked = 0
        stack = ["/"]
        while stack:
            directory = stack.pop()
            after: ChildPosition | None = None
            while True:
                page = await self._fsck.children(directory, after)
                for entry in page:
                    if entry.is_dir:
                        stack.append(entry.path)
                    else:
                        checked += 1
                        await self._expect(entry)
                if len(page) < WALK_PAGE:
                    break
                after = (page[-1].type, page[-1].name)
        for node in list(self._pending):
            await self._flush(node)
        for node, count in sorted(self._unchecked.items()):
            self._errors.append(
                {"node": node, "error": f"{self._failed[node]}; {count} records not checked"}
            )
        return checked

    async def _expect(self, entry: Entry) -> None:
        me = self._fsck.instance_id
        key = entry.blob_key
        if key is None:
            return
        kind = entry.backend_type
        if kind is BackendType.ERASURE:
            layout = await self._fsck.layout_of(entry)
            if layout is None:
                self.findings.append(
                    Finding(
                        MISSING,
                        me,
                        "erasure",
                        "layout",
                        key,
                        entry.path,
                        expected_size=entry.size,
                        detail="erasure layout missing",
                    )
                )
                return
            for shard in layout.shards:
                shard_key = f"{SHARD_PREFIX}{layout.upload_id}/{shard.index}"
                await self._add(
                    shard.instance_id, _Check(entry, SHARDS, shard_key, shard.size, AREA_SHARDS)
                )
            return
        holder = entry.instance_id if kind is BackendType.LOCALFS else me
        if holder == me and not self._fsck.has_backend(kind.value):
            self._failed.setdefault(me, f"no {kind.value} backend configured on {me}")
        await self._add(holder or me, _Check(entry, kind.value, key, entry.size, AREA_BLOBS))
        replica = self._fsck.replica_kind
        # A young version's copy may still be queued: only older ones are expected to be there.
        settled = self._fsck.now() - entry.mtime >= self._grace
        if replica and replica != kind.value and is_blob_key(key) and settled:
            where = entry.instance_id if replica == BackendType.LOCALFS else me
            if where is not None:
                check = _Check(entry, replica, replica_key(key), entry.size, AREA_REPLICAS, True)
                await self._add(where, check)

    async def _add(self, node: str, check: _Check) -> None:
        if node in self._failed:
            self._unchecked[node] += 1
            return
        self._pending[node].append(check)
        if len(self._pending[node]) >= PAGE:
            await self._flush(node)

    async def _flush(self, node: str) -> None:
        checks = self._pending.pop(node, [])
        if not checks:
            return
        sizes = await self._fsck.stat_on(node, [(c.backend, c.key) for c in checks])
        if isinstance(sizes, str):
            self._failed[node] = sizes
            self._unchecked[node] += len(checks)
            return
        for check, size in zip(checks, sizes, strict=True):
            if size == check.size:
                continue
            if not await self._still_named(check):
                continue  # replaced or deleted meanwhile: its bytes went with it
            what = MISSING if size is None else SIZE_MISMATCH
            backend = "erasure" if check.backend == SHARDS else check.backend
            found = Finding(
                what, node, backend, check.area, check.key, check.entry.path, size, check.size
            )
            found.detail = {
                (MISSING, False): "the entry's bytes are not there",
                (MISSING, True): "the HA replica copy is not there",
                (SIZE_MISMATCH, False): "the bytes differ in size from the entry",
                (SIZE_MISMATCH, True): "the HA replica copy differs in size from the entry",
            }[(what, check.replica)]
            if check.area == AREA_SHARDS:
                found.detail = found.detail.replace("bytes", "shard") + " (callfs erasure repair)"
            if self._repair and check.replica:
                found.repaired = await self._fsck.requeue_replica(check.entry)
                if found.repaired:
                    found.detail += "; replication re-queued"
            self.findings.append(found)

    async def _still_named(self, check: _Check) -> bool:
        now = await self._fsck.current(check.entry.path)
        return now is not None and now.blob_key == check.entry.blob_key


def _upload_of(shard_key: str) -> str:
    return shard_key.removeprefix(SHARD_PREFIX).partition("/")[0]


def _index_of(shard_key: str) -> int:
    return int(shard_key.rpartition("/")[2])
