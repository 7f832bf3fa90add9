"""Erasure repair: find shards that are missing, unreachable or corrupt, and rebuild them onto live
nodes from any ``data_shards`` good ones (issue 12).

A check reads every shard in full and compares its SHA-256 with the layout. A repair streams the
file's stripes from the good shards (``_StripeReader``: every block verified), re-encodes each
stripe, and writes only the lost blocks to new shards under the same upload id: on the original
holder when it answers, else on the live node holding the fewest shards of that file. The layout
(keyed by upload id) is then replaced in one store write; readers using the old layout meanwhile
just see a degraded file. Memory is one stripe plus a few blocks, whatever the file size.

A holder that does not answer is replaced only once the caller says it is lost (``may_replace``:
the automatic pass waits ``core/maintenance.DOWN_GRACE``, an operator's repair does not). A
restart or a short outage used to move its shards onto the other nodes for good, leaving 2+1
files with two shards on one node (a review lost a file to two separate single failures that
way). And a healthy file whose shards crowd on some node while a live node holds fewer is spread
again, one shard copied at a time (``_spread``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace

from callfs.erasure.service import ErasureService, _StripeReader, _Writer
from callfs.errors import CallFSError, InsufficientShards, NotFound, PeerUnavailable
from callfs.model import BackendType, ErasureLayout, ShardInfo

log = logging.getLogger(__name__)


@dataclass
class RepairReport:
    checked: int = 0
    healthy: int = 0
    repaired: int = 0
    shards_rebuilt: int = 0
    #: Files with a shard on a holder that is down but not yet lost: rebuilt later if it stays
    #: down (the automatic pass only: an operator's repair takes such a holder as lost).
    waiting: list[str] = field(default_factory=list)
    unrecoverable: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {
            "checked": self.checked,
            "healthy": self.healthy,
            "repaired": self.repaired,
            "shards_rebuilt": self.shards_rebuilt,
            "unrecoverable": self.unrecoverable,
            "failed": self.failed,
        }


class Repairer:
    def __init__(
        self,
        service: ErasureService,
        live_nodes: Callable[[], Awaitable[Sequence[str]]],
        save_layout: Callable[[ErasureLayout], Awaitable[None]],
    ) -> None:
        self.service = service
        self._live_nodes = live_nodes
        self._save = save_layout

    async def bad_shards(self, layout: ErasureLayout) -> list[int]:
        """Indices of shards that cannot be read in full or whose SHA-256 differs."""
        checks = await asyncio.gather(*(self._shard_ok(layout, s) for s in layout.shards))
        return [s.index for s, ok in zip(layout.shards, checks, strict=True) if not ok]

    async def _shard_ok(self, layout: ErasureLayout, shard: ShardInfo) -> bool:
        io = self.service.io
        try:
            stream = await io.open(shard.instance_id, layout.upload_id, shard.index, 0, shard.size)
        except (NotFound, PeerUnavailable, CallFSError, OSError):
            return False
        digest = hashlib.sha256()
        size = 0
        try:
            async for chunk in stream:
                digest.update(chunk)
                size += len(chunk)
        except (CallFSError, OSError):
            return False
        finally:
            await stream.aclose()
        return size == shard.size and digest.hexdigest() == shard.checksum

    async def repair(
        self, layout: ErasureLayout, may_replace: Callable[[str], bool] = lambda _node: True
    ) -> tuple[ErasureLayout | None, int, int]:
        """Check ``layout`` and rebuild what is lost: a shard on a holder that is down only if
        ``may_replace(holder)``. Returns the new layout (None: nothing changed), the number of
        shards rebuilt or moved, and the number left waiting for their holder (down, not yet
        lost). ``InsufficientShards`` when fewer than ``data_shards`` are good."""
        bad = await self.bad_shards(layout)
        if len(layout.shards) - len(bad) < layout.data_shards:
            raise InsufficientShards()
        live = list(await self._live_nodes())
        if not live:
            raise PeerUnavailable("no live node to rebuild shards on")
        waiting = [
            i
            for i in bad
            if layout.shards[i].instance_id not in live
            and not may_replace(layout.shards[i].instance_id)
        ]
        bad = [i for i in bad if i not in waiting]
        if not bad:
            if waiting:
                return None, 0, len(waiting)
            if self.service.io.local.kind == BackendType.S3.value:
                # Shards in a bucket shared by the nodes (``erasure.shard_backend: s3``) have one
                # key whichever node serves them: a "move" wrote the same object, then removed
                # it (found by audit). Nothing is crowded there; nothing to spread.
                return None, 0, 0
            return await self._spread(layout, live)
        fixed, rebuilt = await self._rebuild(layout, bad, self._targets(layout, bad, live))
        return fixed, rebuilt, len(waiting)

    async def _rebuild(
        self, layout: ErasureLayout, bad: Sequence[int], targets: dict[int, str]
    ) -> tuple[ErasureLayout, int]:
        """Re-encode ``layout``'s stripes and write shards ``bad`` to ``targets``."""
        codec = self.service.layout_codec(layout)
        writers = {i: _Writer(self.service.io, targets[i], layout.upload_id, i) for i in bad}
        reader = _StripeReader(self.service.io, layout, codec)
        stripes = codec.stripes(layout.original_size)
        try:
            if stripes:
                await reader.start(0, stripes - 1, exclude=set(bad))
            for number in range(stripes):
                stripe = await reader.stripe(number)
                blocks = await codec.encode(stripe, number)
                await asyncio.gather(*(w.send(blocks[i]) for i, w in writers.items()))
            for writer in writers.values():
                await writer.send(None)
            await asyncio.gather(*(w.task for w in writers.values()))
        except BaseException:
            for writer in writers.values():
                writer.task.cancel()
            await asyncio.gather(*(w.task for w in writers.values()), return_exceptions=True)
            raise
        finally:
            await reader.aclose()
        shards = list(layout.shards)
        for i, writer in writers.items():
            shards[i] = replace(
                shards[i],
                instance_id=targets[i],
                size=writer.size,
                checksum=writer.task.result(),
                backend_type=(
                    self.service.io.local.kind
                    if targets[i] == self.service.instance_id
                    else "localfs"
                ),
            )
        fixed = replace(layout, shards=tuple(shards))
        await self._save(fixed)
        return fixed, len(bad)

    async def _spread(
        self, layout: ErasureLayout, live: Sequence[str]
    ) -> tuple[ErasureLayout | None, int, int]:
        """A healthy file: move shards off a node holding more than its share while a live node
        holds less (a rebuild onto the others while a node was lost), one copy at a time: the
        copy is written, checked against the layout's SHA-256, the layout saved, and only then
        the old copy removed."""
        share = -(-len(layout.shards) // len(live))  # distinct nodes whenever there are enough
        load = Counter({node: 0 for node in live})
        load.update(s.instance_id for s in layout.shards)
        shards = list(layout.shards)
        moved = 0
        for shard in layout.shards:
            holder = shard.instance_id
            under = [n for n in live if load[n] < share]
            if load[holder] <= share or not under or holder not in live:
                continue
            target = min(under, key=lambda n: (load[n], n))
            io = self.service.io
            stream = await io.open(holder, layout.upload_id, shard.index, 0, shard.size)
            try:
                checksum = await io.write(target, layout.upload_id, shard.index, stream)
            finally:
                await stream.aclose()
            if checksum != shard.checksum:
                await io.delete(target, layout.upload_id, shard.index)
                raise CallFSError(f"a moved copy of shard {shard.index} differs: left in place")
            kind = io.local.kind if target == self.service.instance_id else "localfs"
            shards[shard.index] = replace(shard, instance_id=target, backend_type=kind)
            await self._save(replace(layout, shards=tuple(shards)))
            await io.delete(holder, layout.upload_id, shard.index)
            load[holder] -= 1
            load[target] += 1
            moved += 1
        if not moved:
            return None, 0, 0
        return replace(layout, shards=tuple(shards)), moved, 0

    def _targets(
        self, layout: ErasureLayout, bad: Sequence[int], live: Sequence[str]
    ) -> dict[int, str]:
        """Where each lost shard goes: its holder if it answers, else the live node holding the
        fewest shards of this file."""
        load = {node: 0 for node in live}
        for shard in layout.shards:
            if shard.index not in bad and shard.instance_id in load:
                load[shard.instance_id] += 1
        out: dict[int, str] = {}
        for i in bad:
            holder = layout.shards[i].instance_id
            if holder in load:
                out[i] = holder
            else:
                out[i] = min(live, key=lambda n: (load[n], n))
            load[out[i]] += 1
        return out
