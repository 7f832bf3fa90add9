"""Drain and rebalance: ``callfs cluster drain NODE`` and ``callfs cluster rebalance`` (issue 14).

Both are a background job on the node the operator's CLI calls (``api/internal_nodes.py``): the job
lists the namespace once, plans which localfs files go where, and has each file's owner node move
it (``Engine.relocate``: the owner streams the bytes to the target, which stores them under a new
blob key; one conditional placement switch; then the owner removes its copy). The CLI polls the
job's progress; ``/metrics`` shows files and bytes moved and the files remaining.

- **Resumable.** The job keeps no state of its own: every file it moved is already switched in the
  metadata store, so running it again (after a crash, a cancel, a failure) plans only what is
  still to do.
- **One job per cluster.** The job holds the ``node-moves`` lock (a shared store's DLM); with Raft
  and local locks, one job per node, so run it against one node.
- **Throttled.** ``parallel`` files at a time, and at most ``rate`` bytes per second when given.
- **Directories too.** A directory names the node that created it as its owner, and renames and
  deletes of it are routed there; once its files are moved, a drain re-tags each directory of the
  node to a live node (this one, unless it is the node drained): one conditional placement switch
  of the directory's record, no bytes (``MetadataStore.move`` in place).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from callfs.core.engine import Engine
from callfs.core.peer import PeerClient
from callfs.errors import (
    AlreadyExists,
    BadRequest,
    BlobDamaged,
    CallFSError,
    LockTimeout,
    NotFound,
)
from callfs.locks.base import LockManager
from callfs.log import shown_path, shown_size
from callfs.metadata.base import MetadataStore
from callfs.metrics import Metrics
from callfs.model import INTERNAL_PROXY_USER, BackendType, Entry, Identity

log = logging.getLogger(__name__)

JOB_LOCK = "node-moves"
#: Failed paths kept in a job's report (the count is always exact).
MAX_REPORTED = 100
#: A drain lists the node's files again after each pass and moves what is still there (a PUT in
#: flight on the drained node takes its file back when it commits; a file renamed meanwhile
#: was not found under its old path): at most this many passes after the first.
DRAIN_PASSES = 5
_TREE_DEPTH = 1 << 30
_ADMIN = Identity(INTERNAL_PROXY_USER)


@dataclass(slots=True)
class Job:
    """A drain or rebalance: its plan's size and its progress (the CLI prints these)."""

    kind: str
    node: str | None
    state: str = "planning"  # planning, running, done, failed, cancelled
    files_total: int = 0
    bytes_total: int = 0
    files_moved: int = 0
    bytes_moved: int = 0
    files_failed: int = 0
    files_skipped: int = 0
    #: Directories a drain re-tagged to a live node, and those it could not (changed meanwhile).
    dirs_moved: int = 0
    dirs_failed: int = 0
    failed: list[str] = field(default_factory=list)
    error: str = ""
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    #: Bytes of localfs files per live node, as planned (after the job, if it all goes well).
    planned_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def files_remaining(self) -> int:
        return self.files_total - self.files_moved - self.files_failed - self.files_skipped

    @property
    def active(self) -> bool:
        return self.state in ("planning", "running")

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "node": self.node,
            "state": self.state,
            "files_total": self.files_total,
            "bytes_total": self.bytes_total,
            "files_moved": self.files_moved,
            "bytes_moved": self.bytes_moved,
            "files_failed": self.files_failed,
            "files_skipped": self.files_skipped,
            "files_remaining": self.files_remaining,
            "dirs_moved": self.dirs_moved,
            "dirs_failed": self.dirs_failed,
            "failed": self.failed,
            "error": self.error,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "planned_bytes": self.planned_bytes,
        }


Move = tuple[Entry, str]
#: Lists the namespace and decides the moves of a job (it may fill ``Job.planned_bytes``).
Planner = Callable[[Job], Awaitable[list[Move]]]
#: Runs once the files are moved (a drain's directory re-tag).
Finisher = Callable[[Job], Awaitable[None]]
#: The moves still to do once a pass ended (a drain: the node's files still on it).
Recheck = Callable[[Job], Awaitable[list[Move]]]


def plan_drain(node: str, files: Sequence[Entry], targets: Sequence[str]) -> list[Move]:
    """Every localfs file of ``node`` to one of ``targets``: largest first, each to the target
    holding the fewest bytes so far (counting what the plan already sends it)."""
    load = {t: 0 for t in targets}
    for entry in files:
        if entry.instance_id in load:
            load[entry.instance_id] += entry.size
    moves: list[Move] = []
    for entry in sorted(
        (e for e in files if e.instance_id == node), key=lambda e: (-e.size, e.path)
    ):
        target = min(load, key=lambda t: (load[t], t))
        load[target] += entry.size
        moves.append((entry, target))
    return moves


def plan_rebalance(files: Sequence[Entry], nodes: Sequence[str], tolerance: float) -> list[Move]:
    """Moves from the fullest node to the emptiest until every node's bytes lie within
    ``tolerance`` (a fraction) of the mean, or no file can narrow the gap any more."""
    held: dict[str, list[Entry]] = {n: [] for n in nodes}
    for entry in files:
        if entry.instance_id in held:
            held[entry.instance_id].append(entry)
    load = {n: sum(e.size for e in held[n]) for n in nodes}
    if len(nodes) < 2:
        return []
    mean = sum(load.values()) / len(nodes)
    slack = max(tolerance * mean, 1.0)
    for entries in held.values():
        entries.sort(key=lambda e: (e.size, e.path))  # smallest first
    moves: list[Move] = []
    for _ in range(len(files)):
        high = max(nodes, key=lambda n: (load[n], n))
        low = min(nodes, key=lambda n: (load[n], n))
        if load[high] - mean <= slack and mean - load[low] <= slack:
            break
        gap = load[high] - load[low]
        want = min(load[high] - mean, mean - load[low])
        candidates = held[high]
        # the largest file that does not overshoot the mean, else the smallest that still helps
        fitting = [e for e in candidates if 0 < e.size <= want]
        chosen = fitting[-1] if fitting else next((e for e in candidates if e.size < gap), None)
        if chosen is None or chosen.size == 0:
            break
        candidates.remove(chosen)
        held[low].append(chosen)
        held[low].sort(key=lambda e: (e.size, e.path))
        load[high] -= chosen.size
        load[low] += chosen.size
        moves.append((chosen, low))
    return moves


class NodeMoves:
    """Runs at most one drain or rebalance job on this node; owned by the HTTP app (its
    cleanup cancels a running job)."""

    def __init__(
        self,
        engine: Engine,
        meta: MetadataStore,
        peers: PeerClient,
        members: Callable[[], Sequence[str]],
        locks: LockManager,
        metrics: Metrics | None = None,
    ) -> None:
        self._engine = engine
        self._meta = meta
        self._peers = peers
        self._members = members
        self._locks = locks
        self._metrics = metrics
        self.job: Job | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def instance_id(self) -> str:
        return self._engine.settings.instance_id

    async def live_nodes(self) -> list[str]:
        """This node and every member whose ``/health`` answers now."""
        others = sorted({m for m in self._members() if m != self.instance_id})
        answers = await asyncio.gather(*(self._peers.alive(n) for n in others))
        return [self.instance_id, *(n for n, ok in zip(others, answers, strict=True) if ok)]

    async def _localfs_files(self) -> list[Entry]:
        entries = await self._meta.list_tree("/", _TREE_DEPTH)
        return [
            e
            for e in entries
            if not e.is_dir and e.backend_type is BackendType.LOCALFS and e.instance_id
        ]

    def start_drain(self, node: str, parallel: int, rate: float) -> Job:
        """Start draining ``node``. ``AlreadyExists`` if a job runs here; ``BadRequest`` for a
        node this cluster does not know."""
        if not self._engine.known_instance(node):
            raise BadRequest(f"unknown node {node!r}")

        async def plan(job: Job) -> list[Move]:
            files = await self._localfs_files()
            targets = [n for n in await self.live_nodes() if n != node]
            if not targets:
                raise BadRequest("no other live node to move the files to")
            moves = plan_drain(node, files, targets)
            job.planned_bytes = _after(files, moves, targets)
            return moves

        async def again(job: Job) -> list[Move]:
            files = await self._localfs_files()
            targets = [n for n in await self.live_nodes() if n != node]
            if not targets:
                raise BadRequest("no other live node to move the files to")
            return plan_drain(node, files, targets)

        async def finish(job: Job) -> None:
            await self._retag_directories(job, node)

        return self._start(Job("drain", node), plan, parallel, rate, finish, again)

    def start_rebalance(self, tolerance: float, parallel: int, rate: float) -> Job:
        """Start evening out localfs bytes over the live nodes."""
        if not 0 <= tolerance < 1:
            raise BadRequest("tolerance must be at least 0 and below 1")

        async def plan(job: Job) -> list[Move]:
            files = await self._localfs_files()
            nodes = await self.live_nodes()
            moves = plan_rebalance(files, nodes, tolerance)
            job.planned_bytes = _after(files, moves, nodes)
            return moves

        return self._start(Job("rebalance", None), plan, parallel, rate)

    def _start(
        self,
        job: Job,
        plan: Planner,
        parallel: int,
        rate: float,
        finish: Finisher | None = None,
        again: Recheck | None = None,
    ) -> Job:
        if self.job is not None and self.job.active:
            raise AlreadyExists(f"a {self.job.kind} job is running on this node")
        if not 1 <= parallel <= 64:
            raise BadRequest("parallel must be between 1 and 64")
        if rate < 0:
            raise BadRequest("rate must not be negative")
        self.job = job
        self._task = asyncio.create_task(self._run(job, plan, parallel, rate, finish, again))
        return job

    async def _run(
        self,
        job: Job,
        plan: Planner,
        parallel: int,
        rate: float,
        finish: Finisher | None,
        again: Recheck | None,
    ) -> None:
        gauge = self._metrics.node_moves_remaining.labels(job.kind) if self._metrics else None
        try:
            async with self._locks.hold(JOB_LOCK, 1.0):
                moves = await plan(job)
                job.files_total = len(moves)
                job.bytes_total = sum(e.size for e, _ in moves)
                job.state = "running"
                log.info(
                    "%s: %d files (%s) to move",
                    job.kind,
                    job.files_total,
                    shown_size(job.bytes_total),
                )
                await self._execute(job, moves, parallel, rate, gauge)
                if again is not None:
                    await self._until_done(job, again, parallel, rate, gauge)
                if finish is not None:
                    await finish(job)
            job.state = "done" if not (job.files_failed or job.dirs_failed) else "failed"
            if job.files_failed:
                job.error = f"{job.files_failed} file(s) could not be moved; run it again"
            elif job.dirs_failed:
                job.error = f"{job.dirs_failed} directory(ies) could not be moved; run it again"
        except asyncio.CancelledError:
            job.state = "cancelled"
            raise
        except LockTimeout:
            job.state = "failed"
            job.error = "another drain or rebalance is running in the cluster"
        except CallFSError as exc:
            job.state = "failed"
            job.error = exc.message
            log.warning("%s failed: %s", job.kind, exc.message)
        except Exception as exc:
            job.state = "failed"
            job.error = f"internal error: {type(exc).__name__}"
            log.exception("%s failed", job.kind)
        finally:
            job.finished_at = time.time()
            if gauge is not None:
                gauge.set(0)
            log.info(
                "%s %s: moved %d files (%s), %d failed, %d skipped",
                job.kind,
                job.state,
                job.files_moved,
                shown_size(job.bytes_moved),
                job.files_failed,
                job.files_skipped,
            )

    async def _until_done(
        self, job: Job, again: Recheck, parallel: int, rate: float, gauge: Any
    ) -> None:
        """Pass after pass, move what is still to move (``again``): a drain reports done only
        when the node holds no file any more. What failed or was skipped is planned again; after
        ``DRAIN_PASSES`` what is left counts as failed (clients still writing through the node
        drained: the new files stay there)."""
        for passes in range(DRAIN_PASSES + 1):
            if passes:  # a target restarting, a write about to commit: some time first
                await asyncio.sleep(min(0.5 * 2 ** (passes - 1), 4.0))
            moves = await again(job)
            if not moves:
                return
            # this pass decides the files that failed or were skipped before (the reason a file
            # failed is kept for the report if it is still there at the end)
            why = {line.split(": ", 1)[0]: line for line in job.failed}
            job.files_total -= job.files_failed + job.files_skipped
            job.files_failed = job.files_skipped = 0
            job.failed.clear()
            if passes == DRAIN_PASSES:
                job.files_total += len(moves)
                job.files_failed = len(moves)
                job.failed.extend(
                    why.get(entry.path)
                    or f"{entry.path}: still on {entry.instance_id} (written or renamed during"
                    " the drain)"
                    for entry, _ in moves[:MAX_REPORTED]
                )
                return
            log.info("%s: %d files still to move, pass %d", job.kind, len(moves), passes + 2)
            job.files_total += len(moves)
            job.bytes_total = job.bytes_moved + sum(e.size for e, _ in moves)
            await self._execute(job, moves, parallel, rate, gauge)

    async def _execute(
        self, job: Job, moves: list[Move], parallel: int, rate: float, gauge: Any
    ) -> None:
        pending = iter(moves)
        began, before = time.monotonic(), job.bytes_moved  # (a drain's later passes too)

        def remaining() -> None:
            if gauge is not None:
                gauge.set(job.files_remaining)

        remaining()

        async def worker() -> None:
            for entry, target in pending:
                try:
                    await self._engine.relocate(_ADMIN, entry, target)
                except NotFound as exc:
                    if not isinstance(exc, BlobDamaged):
                        job.files_skipped += 1  # deleted or moved away meanwhile
                    else:  # its bytes are damaged: a failure to report (fsck: size-mismatch)
                        job.files_failed += 1
                        if len(job.failed) < MAX_REPORTED:
                            job.failed.append(f"{entry.path}: {exc.message}")
                except CallFSError as exc:
                    job.files_failed += 1
                    if len(job.failed) < MAX_REPORTED:
                        job.failed.append(f"{entry.path}: {exc.message}")
                    log.warning(
                        "%s: could not move %s: %s", job.kind, shown_path(entry.path), exc.message
                    )
                else:
                    job.files_moved += 1
                    job.bytes_moved += entry.size
                    if self._metrics is not None:
                        self._metrics.node_moves_files.labels(job.kind).inc()
                        self._metrics.node_moves_bytes.labels(job.kind).inc(entry.size)
                remaining()
                if rate > 0:  # throttle: never ahead of rate bytes per second
                    ahead = (job.bytes_moved - before) / rate - (time.monotonic() - began)
                    if ahead > 0:
                        await asyncio.sleep(ahead)

        await asyncio.gather(*(worker() for _ in range(parallel)))

    async def _retag_directories(self, job: Job, node: str) -> None:
        """Every directory whose record names ``node`` as its owner now names a live node (this
        one unless it is ``node``): metadata only, one conditional switch each. A directory
        changed meanwhile is reported; running the drain again re-tags it."""
        targets = [n for n in await self.live_nodes() if n != node]
        if not targets:
            raise BadRequest("no other live node to move the directories to")
        target = self.instance_id if self.instance_id != node else targets[0]
        entries = await self._meta.list_tree("/", _TREE_DEPTH)
        for entry in entries:
            if not entry.is_dir or entry.instance_id != node:
                continue
            try:
                await self._engine.retag_directory(entry, target)
            except NotFound:
                continue  # deleted meanwhile
            except CallFSError as exc:
                job.dirs_failed += 1
                if len(job.failed) < MAX_REPORTED:
                    job.failed.append(f"{entry.path}/: {exc.message}")
                log.warning(
                    "%s: could not re-tag %s: %s", job.kind, shown_path(entry.path), exc.message
                )
                continue
            job.dirs_moved += 1

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._task = None


def _after(files: Sequence[Entry], moves: Sequence[Move], nodes: Sequence[str]) -> dict[str, int]:
    """Bytes per node once ``moves`` are done."""
    load = {n: 0 for n in nodes}
    for entry in files:
        if entry.instance_id in load:
            load[entry.instance_id] += entry.size
    for entry, target in moves:
        if entry.instance_id in load:
            load[entry.instance_id] -= entry.size
        load[target] = load.get(target, 0) + entry.size
    return load
