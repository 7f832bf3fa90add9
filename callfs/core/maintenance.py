"""Erasure maintenance of a node: ``callfs erasure repair [PATH]`` and the automatic pass.

The automatic pass runs on one node of the cluster at a time (the daemon gates it with
``core.background.one_node_at_a_time``: the Raft leader, or the holder of the ``erasure-repair``
lock with a shared store), walks every erasure-coded file, throttled, and
rebuilds what a lost node or a damaged disk took (``erasure/repair.py``). ``/metrics`` shows the
degraded files it found, its backlog and the shards it rebuilt.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

import aiohttp

from callfs.core.peer import PeerClient
from callfs.erasure.repair import Repairer, RepairReport
from callfs.erasure.service import ErasureService
from callfs.errors import BadRequest, CallFSError, InsufficientShards, NotFound
from callfs.log import shown_path
from callfs.metadata.base import MetadataStore
from callfs.metrics import Metrics
from callfs.model import BackendType, Entry, ErasureLayout

log = logging.getLogger(__name__)

#: Pause between files of the automatic pass (throttle: disks and peers keep serving).
PASS_PAUSE = 0.05
#: The first automatic pass after start (then every ``erasure.repair_interval``).
FIRST_PASS = 60.0
_TREE_DEPTH = 1 << 30
_PROBE_TIMEOUT = 2.0
#: A holder that does not answer is lost, and its shards rebuilt on other nodes, only after it has
#: been down this long (Ceph's "down" before "out" is 10 minutes too): a restart or a short outage
#: leaves its shards where they are (``Repairer`` counts its files as waiting meanwhile).
DOWN_GRACE = 600.0
#: How long one round of ``/health`` probes stands for the files of a pass (seconds).
_LIVE_FOR = 2.0


class ErasureMaintenance:
    def __init__(
        self,
        meta: MetadataStore,
        service: ErasureService,
        peers: PeerClient,
        peer_ids: Callable[[], Sequence[str]],
        metrics: Metrics | None = None,
    ) -> None:
        self._meta = meta
        self._service = service
        self._peers = peers
        self._peer_ids = peer_ids
        self._metrics = metrics
        self.repairer = Repairer(service, self.live_nodes, self._save)
        self._running = asyncio.Lock()
        #: Peer -> when (monotonic) ``live_nodes`` first found it down, since it last answered.
        self._down_since: dict[str, float] = {}
        self._live: tuple[float, list[str]] | None = None

    def lost(self, node: str) -> bool:
        """Whether ``node`` has been down for ``DOWN_GRACE`` (its shards may be rebuilt
        elsewhere), or is no peer at all any more (removed from the cluster). The clock starts
        at this node's first probe that found it down (a new Raft leader starts it again)."""
        if node != self._service.instance_id and node not in set(self._peer_ids()):
            return True
        since = self._down_since.get(node)
        return since is not None and time.monotonic() - since >= DOWN_GRACE

    async def _save(self, layout: ErasureLayout) -> None:
        await self._meta.put_erasure(layout)

    async def live_nodes(self) -> list[str]:
        """This node and every peer whose ``/health`` answers now (one probe round serves the
        files of a pass for ``_LIVE_FOR`` seconds)."""
        now = time.monotonic()
        if self._live is not None and now - self._live[0] < _LIVE_FOR:
            return list(self._live[1])
        live = await self._probe()
        self._live = (time.monotonic(), live)
        return list(live)

    async def _probe(self) -> list[str]:
        me = self._service.instance_id
        others = [p for p in self._peer_ids() if p != me]

        async def alive(node: str) -> bool:
            base = self._peers.endpoint(node)
            if base is None:
                return False
            try:
                async with self._peers.session.get(
                    base.rstrip("/") + "/health",
                    timeout=aiohttp.ClientTimeout(total=_PROBE_TIMEOUT),
                ) as resp:
                    return resp.status == 200
            except (aiohttp.ClientError, TimeoutError, OSError, CallFSError):
                return False

        answers = await asyncio.gather(*(alive(n) for n in others))
        now = time.monotonic()
        for node, ok in zip(others, answers, strict=True):
            if ok:
                self._down_since.pop(node, None)
            else:
                self._down_since.setdefault(node, now)
        return [me, *(n for n, ok in zip(others, answers, strict=True) if ok)]

    async def _files(self, path: str | None) -> list[Entry]:
        if path is not None:
            entry = await self._meta.get(path)
            if entry is None:
                raise NotFound()
            if entry.backend_type is not BackendType.ERASURE and not entry.is_dir:
                raise BadRequest("file is not erasure coded")
            if not entry.is_dir:
                return [entry]
            below = await self._meta.list_tree(path, _TREE_DEPTH)
        else:
            below = await self._meta.list_tree("/", _TREE_DEPTH)
        return [e for e in below if e.backend_type is BackendType.ERASURE and not e.is_dir]

    async def repair(
        self, path: str | None = None, pause: float = 0.0, patient: bool = False
    ) -> RepairReport:
        """Check (and rebuild) every erasure-coded file at or below ``path`` (None: all).
        ``patient`` (the automatic pass): a holder that is down keeps its shards until it has
        been down for ``DOWN_GRACE``; an operator's repair takes a holder that is down as lost."""
        report = RepairReport()
        may_replace = self.lost if patient else (lambda _node: True)
        async with self._running:
            files = await self._files(path)
            for entry in files:
                if self._metrics is not None:
                    self._metrics.erasure_repair_backlog.set(len(files) - report.checked)
                report.checked += 1
                try:
                    layout = await self._meta.get_erasure(entry.blob_key or entry.path)
                    if layout is None:
                        report.failed.append(entry.path)
                        continue
                    fixed, rebuilt, waiting = await self.repairer.repair(layout, may_replace)
                except InsufficientShards:
                    report.unrecoverable.append(entry.path)
                    log.error(
                        "erasure file %s has too few intact shards to repair",
                        shown_path(entry.path),
                    )
                    continue
                except (CallFSError, OSError) as exc:
                    report.failed.append(entry.path)
                    log.warning("could not repair %s: %s", shown_path(entry.path), exc)
                    continue
                if waiting:
                    report.waiting.append(entry.path)
                if fixed is None:
                    if not waiting:
                        report.healthy += 1
                else:
                    report.repaired += 1
                    report.shards_rebuilt += rebuilt
                    if self._metrics is not None:
                        self._metrics.erasure_shards_repaired.inc(rebuilt)
                    log.info("rebuilt or moved %d shard(s) of %s", rebuilt, shown_path(entry.path))
                    await self._forget_if_replaced(entry, fixed)
                if pause:
                    await asyncio.sleep(pause)
            if self._metrics is not None:
                self._metrics.erasure_repair_backlog.set(0)
                self._metrics.erasure_degraded.set(
                    len(report.unrecoverable) + len(report.failed) + len(report.waiting)
                )
        return report

    async def _forget_if_replaced(self, entry: Entry, fixed: ErasureLayout) -> None:
        """A PUT or DELETE may have dropped this upload while it was being repaired: then the
        layout just saved is an orphan, and its shards go too."""
        now = await self._meta.get(entry.path)
        if now is None or now.blob_key != fixed.upload_id:
            await self._service.remove(fixed)
            await self._meta.delete_erasure(fixed.upload_id)

    async def automatic_pass(self) -> None:
        """One throttled pass (the daemon runs it on one node of the cluster at a time:
        ``core.background.one_node_at_a_time``)."""
        await self.repair(pause=PASS_PAUSE, patient=True)
