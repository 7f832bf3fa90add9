"""Erasure-coded files (API.md §11): streamed encode to shard holders, verified range reads that
rebuild from any ``data_shards`` good shards, and shard removal.

Upload: the body is cut into stripes of ``k × block`` bytes; each stripe becomes ``k + m`` framed
blocks (block + its tag, ``codec.py``) sent to the shard holders as they are produced. Memory
is bounded by one stripe plus ``_DEPTH`` blocks queued per holder, whatever the file size. Each
holder hashes the shard it stores (SHA-256, ``ShardIO.write``), so the receiving node hashes only
its own. The layout (holders, sizes, whole-shard SHA-256) is returned only after every shard is
durable; the caller commits it. Any failure removes what was written.

Read: the stripes a byte range needs are fetched from ``k`` holders in parallel (data shards
first: no decoding when they are all good); every block is verified before use; a missing,
unreachable or corrupt block is replaced by one from another shard. Fewer than ``k`` good blocks
for the first stripe → ``InsufficientShards`` before any byte is sent; later → the stream raises
and the connection is cut (a short body, never a wrong one).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from dataclasses import dataclass

from callfs.concurrency import gather_all, put_unless_done, retrieved, run_cpu, to_end
from callfs.erasure.codec import (
    DEFAULT_BLOCK,
    DEFAULT_FRAME,
    LEGACY_BLOCK,
    LEGACY_FRAME,
    Buffer,
    Codec,
)
from callfs.erasure.shards import Pending, ShardIO, read_parts
from callfs.errors import (
    BadRequest,
    CallFSError,
    InsufficientShards,
    InternalError,
    NotFound,
    PeerUnavailable,
)
from callfs.model import ErasureLayout, ShardInfo
from callfs.storage.base import ByteStream, new_blob_key

log = logging.getLogger(__name__)

#: Framed blocks queued per holder while its writer catches up, and stripes being encoded at
#: once: memory stays within (stripes + depth) x (k + m) blocks whatever the file size.
_DEPTH = 2
_STRIPES_IN_FLIGHT = 2
MAX_SHARDS = 256


@dataclass(frozen=True, slots=True)
class Profile:
    data_shards: int
    parity_shards: int

    def __post_init__(self) -> None:
        if self.data_shards < 1 or self.parity_shards < 1:
            raise BadRequest("data and parity shards must be integers >= 1")
        if self.data_shards + self.parity_shards > MAX_SHARDS:
            raise BadRequest(f"data + parity shards must be <= {MAX_SHARDS}")


def placement(me: str, others: Sequence[str], total: int) -> list[str]:
    """Holder of each shard index: round-robin over this node first, then ``others`` in order
    (API.md §11.2): shard 0 is always here; a node holds several shards when there are few."""
    ring = [me, *[o for o in others if o != me]]
    return [ring[i % len(ring)] for i in range(total)]


class _Writer:
    """One holder's shard: framed blocks (block, tag) go through a bounded queue to
    ``ShardIO.write``, which gets the block and its tag as two chunks; ``task`` ends with the
    shard's SHA-256, computed by its holder."""

    def __init__(self, io: ShardIO, holder: str, upload_id: str, index: int) -> None:
        self.holder = holder
        self.index = index
        self.size = 0
        self._queue: asyncio.Queue[tuple[Buffer, bytes] | None] = asyncio.Queue(_DEPTH)
        self.task: asyncio.Future[str] = asyncio.ensure_future(
            io.write(holder, upload_id, index, self._blocks())
        )

    async def _blocks(self) -> AsyncIterator[Buffer]:
        while True:
            part = await self._queue.get()
            if part is None:
                return
            yield part[0]
            yield part[1]

    async def send(self, block: tuple[Buffer, bytes] | None) -> None:
        if block is not None:
            self.size += len(block[0]) + len(block[1])
        if not await put_unless_done(self._queue, block, self.task):
            # the writer ended before taking the block: it failed (or returned early)
            self.task.result()
            raise InternalError("a shard writer stopped early")


class ErasureService:
    def __init__(self, instance_id: str, io: ShardIO, block_size: int | None = None) -> None:
        self.instance_id = instance_id
        self.io = io
        self._block = block_size

    def codec(self, data_shards: int, parity_shards: int, upload_id: str) -> Codec:
        """The codec of a new upload."""
        block = self._block or DEFAULT_BLOCK
        return Codec(data_shards, parity_shards, block, DEFAULT_FRAME, tail=True, key=upload_id)

    @staticmethod
    def layout_codec(layout: ErasureLayout) -> Codec:
        """The codec ``layout`` was written with."""
        return Codec(
            layout.data_shards,
            layout.parity_shards,
            layout.block_size or LEGACY_BLOCK,
            layout.frame,
            tail=layout.tail,
            key=layout.upload_id,
        )

    # ---- upload --------------------------------------------------------------------------------
    async def store(
        self,
        file_path: str,
        chunks: AsyncIterable[bytes],
        profile: Profile,
        holders: Sequence[str],
    ) -> ErasureLayout:
        """Encode ``chunks`` into shards on ``holders`` (one per shard index); the layout of the
        durable result, keyed by its new upload id. On failure nothing stays behind."""
        k, m = profile.data_shards, profile.parity_shards
        upload_id = new_blob_key()
        codec = self.codec(k, m, upload_id)
        writers = [_Writer(self.io, holders[i], upload_id, i) for i in range(k + m)]
        size = 0
        jobs: collections.deque[asyncio.Future[None]] = collections.deque()
        try:
            # Chunks are joined into each stripe once (one copy; the stripe's data blocks are
            # views of it from then on).
            parts: list[bytes | memoryview] = []
            held = number = 0
            stripe = codec.stripe_size
            async for chunk in chunks:
                size += len(chunk)
                view = memoryview(chunk)
                while held + len(view) >= stripe:
                    take = stripe - held
                    parts.append(view[:take])
                    view = view[take:]
                    await self._emit(codec, writers, b"".join(parts), number, jobs)
                    parts, held, number = [], 0, number + 1
                if view:
                    parts.append(view)
                    held += len(view)
            if held:
                await self._emit(codec, writers, b"".join(parts), number, jobs)
            while jobs:
                await jobs.popleft()
            for w in writers:
                await w.send(None)
            await asyncio.gather(*(w.task for w in writers))
        except BaseException as exc:
            for job in jobs:
                job.cancel()
            await asyncio.gather(*jobs, return_exceptions=True)
            for w in writers:
                w.task.cancel()
            await asyncio.gather(*(w.task for w in writers), return_exceptions=True)
            await self._remove(upload_id, [w.holder for w in writers])
            if isinstance(exc, CallFSError | asyncio.CancelledError):
                raise
            if isinstance(exc, OSError):
                raise InternalError("a shard could not be stored") from exc
            raise
        shards = tuple(
            ShardInfo(
                index=w.index,
                instance_id=w.holder,
                backend_type=self.io.local.kind if w.holder == self.instance_id else "localfs",
                path=f".erasure/{upload_id}/{w.index}",
                size=w.size,
                checksum=w.task.result(),
            )
            for w in writers
        )
        return ErasureLayout(
            file_path=upload_id,
            original_size=size,
            data_shards=k,
            parity_shards=m,
            shard_size=codec.shard_size(size),
            upload_id=upload_id,
            shards=shards,
            block_size=codec.block_size,
            frame=codec.frame,
            tail=codec.tail,
        )

    @staticmethod
    async def _emit(
        codec: Codec,
        writers: list[_Writer],
        stripe: bytes,
        number: int,
        jobs: collections.deque[asyncio.Future[None]],
    ) -> None:
        """Start encoding ``stripe`` while earlier stripes are still being sent (two cores: zfec
        releases the GIL). Sends stay in stripe order: each job waits for the previous one before
        it sends."""
        previous = jobs[-1] if jobs else None

        async def job() -> None:
            blocks = await codec.encode(stripe, number)
            if previous is not None:
                await previous
            await asyncio.gather(*(w.send(b) for w, b in zip(writers, blocks, strict=True)))

        jobs.append(asyncio.ensure_future(job()))
        while len(jobs) > _STRIPES_IN_FLIGHT:
            await jobs.popleft()

    # ---- delete ------------------------------------------------------------------------------
    async def remove(self, layout: ErasureLayout) -> None:
        """Remove every shard of ``layout`` on its holder (best effort, logged)."""
        await asyncio.gather(
            *(self.io.delete(s.instance_id, layout.upload_id, s.index) for s in layout.shards)
        )

    async def _remove(self, upload_id: str, holders: Sequence[str]) -> None:
        await asyncio.gather(*(self.io.delete(h, upload_id, i) for i, h in enumerate(holders)))

    # ---- read --------------------------------------------------------------------------------
    async def open(self, layout: ErasureLayout, offset: int, length: int) -> ByteStream:
        """``[offset, offset+length)`` of the file (length already clamped to its size)."""
        codec = self.layout_codec(layout)
        reader = _StripeReader(self.io, layout, codec)
        if length <= 0:
            return _ErasureStream(reader, range(0), 0, 0, 0)
        first, last = codec.stripe_range(offset, length)
        await reader.start(first, last)
        try:
            first_stripe = await reader.stripe_parts(first)  # 503 decided before any byte is sent
        except BaseException:
            await reader.aclose()
            raise
        return _ErasureStream(
            reader, range(first + 1, last + 1), offset, length, first, first_stripe
        )


#: How long a shard's holder may take to open it or to deliver a block before the shard counts
#: as missing and another one (parity) is read instead. A frozen holder (SIGSTOP, a hung disk)
#: had held every read until the whole open timed out (``server.file_op_timeout``: 503), parity
#: unused; found by an audit. A slow holder only costs the rebuild of what it held.
SHARD_WAIT = 3.0


class _StripeReader:
    """Reads stripes ``first..last`` sequentially from ``k`` shards at a time, replacing a shard
    whose block is missing, corrupt or late (``SHARD_WAIT``) by another one. A late shard is
    asked again, without the bound, only when no other is left (a slow link, not a frozen
    holder: a read that once succeeded slowly must not become a 503)."""

    def __init__(self, io: ShardIO, layout: ErasureLayout, codec: Codec) -> None:
        self._io = io
        self._layout = layout
        self._codec = codec
        self._open: dict[int, tuple[ByteStream, AsyncIterator[Buffer], Pending]] = {}
        self._bad: set[int] = set()
        #: Shards dropped for being late (``SHARD_WAIT``); the last resort.
        self._late: set[int] = set()
        self._patient = False
        self._last = 0

    def _holder(self, index: int) -> ShardInfo:
        return self._layout.shards[index]

    async def _open_one(self, index: int, stripe: int) -> bool:
        info = self._holder(index)
        size = self._layout.original_size
        start = self._codec.block_span(stripe, size)[0]
        end = sum(self._codec.block_span(self._last, size))
        length = end - start
        try:
            async with asyncio.timeout(None if self._patient else SHARD_WAIT):
                stream = await self._io.open(
                    info.instance_id, self._layout.upload_id, index, start, length
                )
        except TimeoutError:
            log.warning(
                "erasure shard %d of %s on %s is late; using another shard",
                index,
                self._layout.upload_id,
                info.instance_id,
            )
            # already the last resort: a timeout now (ETIMEDOUT from the disk, say) is a failure
            (self._bad if self._patient else self._late).add(index)
            return False
        except (NotFound, PeerUnavailable, OSError, CallFSError) as exc:
            log.warning(
                "erasure shard %d of %s unavailable on %s: %s",
                index,
                self._layout.upload_id,
                info.instance_id,
                type(exc).__name__,
            )
            self._bad.add(index)
            return False
        self._open[index] = (stream, aiter(stream), Pending())
        return True

    async def start(self, first: int, last: int, exclude: set[int] | None = None) -> None:
        self._last = last
        self._bad |= exclude or set()
        k = self._codec.data_shards
        want = [i for i in range(len(self._layout.shards)) if i not in self._bad][:k]
        results = await asyncio.gather(*(self._open_one(i, first) for i in want))
        missing = results.count(False)
        spare = iter(
            i
            for i in range(len(self._layout.shards))
            if i not in self._bad and i not in self._late and i not in want
        )
        while missing:
            index = next(spare, None)
            if index is None:
                break
            if await self._open_one(index, first):
                missing -= 1

    async def _block(self, index: int, number: int) -> list[memoryview] | None:
        """Stripe ``number``'s block of shard ``index``, verified, as views of the pieces it
        arrived in (no copy); None if it is missing, short or corrupt."""
        stream, it, pending = self._open[index]
        framed: list[memoryview]
        length = self._codec.block_span(number, self._layout.original_size)[1]
        late = False
        try:
            async with asyncio.timeout(None if self._patient else SHARD_WAIT):
                framed = await read_parts(it, pending, length)
        except TimeoutError:
            framed, late = [], True
        except (CallFSError, OSError):
            framed = []
        codec = self._codec
        if not framed:
            block = None
        elif codec.frame != LEGACY_FRAME:  # XXH3, tens of GB/s: a thread hop costs more
            block = codec.unframe_parts(framed, index, number)
        else:
            block = await run_cpu(codec.unframe_parts, framed, index, number)
        if block is None:
            log.warning(
                "erasure shard %d of %s is %s; using another shard",
                index,
                self._layout.upload_id,
                "late" if late else "short or corrupt",
            )
            (self._late if late and not self._patient else self._bad).add(index)
            del self._open[index]
            with contextlib.suppress(Exception):
                await stream.aclose()
        return block

    async def stripe(self, number: int) -> bytes:
        """Stripe ``number`` in one buffer (k blocks, the tail's zero padding included)."""
        return b"".join(await self.stripe_parts(number))

    async def stripe_parts(self, number: int) -> list[Buffer]:
        """Stripe ``number`` as pieces in order (views of what the holders sent when every data
        block is intact)."""
        return await self.decode(number, await self.stripe_blocks(number))

    async def decode(self, number: int, blocks: dict[int, list[memoryview]]) -> list[Buffer]:
        """Stripe ``number`` from ``k`` of its verified blocks (``stripe_blocks``)."""
        codec = self._codec
        return await codec.decode(blocks, codec.block_len(number, self._layout.original_size))

    async def stripe_blocks(self, number: int) -> dict[int, list[memoryview]]:
        """``k`` verified blocks of stripe ``number`` by shard index (data blocks first)."""
        k = self._codec.data_shards
        got: dict[int, list[memoryview]] = {}
        while len(got) < k:
            active = [i for i in self._open if i not in got]
            if not active:
                # open replacements, positioned at this stripe
                candidates = [
                    i
                    for i in range(len(self._layout.shards))
                    if i not in self._bad
                    and i not in self._late
                    and i not in self._open
                    and i not in got
                ]
                if not candidates and self._late:
                    # only late shards are left: ask them again and wait as long as they take
                    candidates, self._patient = sorted(self._late), True
                    self._late.clear()
                if not candidates:
                    raise InsufficientShards()
                need = k - len(got)
                await gather_all(*(self._open_one(i, number) for i in candidates[:need]))
                continue
            # a failed read stops the others before ``aclose`` can close what they read
            blocks = await gather_all(*(self._block(i, number) for i in active))
            for i, block in zip(active, blocks, strict=True):
                if block is not None:
                    got[i] = block
        if len(got) > k:
            got = dict(sorted(got.items())[:k])
        return got

    async def aclose(self) -> None:
        opened, self._open = self._open, {}
        for stream, _it, _buf in opened.values():
            with contextlib.suppress(Exception):
                await stream.aclose()


#: Stripes read ahead of the one being sent, each rebuilt as soon as its blocks are in: reads
#: stay sequential per shard, while rebuilds (zfec, on the CPU pool, without the GIL) of
#: consecutive stripes run at once on both cores and beside the sending.
READ_AHEAD = 2


class _ErasureStream:
    """A ByteStream over rebuilt stripes, trimmed to the requested range. A feeder task reads the
    stripes after the first one in order and hands each one's rebuild (a task) to the sender
    through a queue of ``READ_AHEAD``."""

    def __init__(
        self,
        reader: _StripeReader,
        rest: range,
        offset: int,
        length: int,
        first: int,
        first_stripe: list[Buffer] | None = None,
    ) -> None:
        self._reader = reader
        self._rest = rest
        self._offset = offset
        self.length = length
        self._first = first
        self._first_stripe = first_stripe or []
        self._rebuilds: asyncio.Queue[asyncio.Future[list[Buffer]]] = asyncio.Queue(READ_AHEAD)
        self._feeder: asyncio.Task[None] | None = None
        self._closing: asyncio.Task[None] | None = None

    async def _feed(self) -> None:
        """Read the remaining stripes in order; queue each one's rebuild. A failure is queued
        in the failed stripe's place, so the sender meets it after every stripe before it."""
        reader = self._reader
        for number in self._rest:
            try:
                blocks = await reader.stripe_blocks(number)
            except Exception as exc:
                await self._rebuilds.put(_failed(exc))
                return
            rebuild = asyncio.ensure_future(reader.decode(number, blocks))
            rebuild.add_done_callback(retrieved)  # its error is unread if the stream closes first
            try:
                await self._rebuilds.put(rebuild)
            except asyncio.CancelledError:
                rebuild.cancel()  # never queued: nobody else would end it
                raise

    async def __aiter__(self) -> AsyncIterator[Buffer]:
        if self.length <= 0:
            return
        size = self._reader._codec.stripe_size
        start, end = self._offset, self._offset + self.length
        numbers = [self._first, *self._rest]
        pieces = self._first_stripe
        if self._rest and self._feeder is None and self._closing is None:
            self._feeder = asyncio.ensure_future(self._feed())
        for i, number in enumerate(numbers):
            if i:
                pieces = await (await self._rebuilds.get())
            pos = number * size  # file offset of the piece
            for piece in pieces:
                n = len(piece)
                lo, hi = max(start - pos, 0), min(end - pos, n)
                if hi > lo:
                    yield piece if (lo, hi) == (0, n) else memoryview(piece)[lo:hi]
                pos += n
                if pos >= end:
                    return

    async def aclose(self) -> None:
        # One close, to its end even if a caller is cancelled meanwhile (a client that left:
        # the handler is cancelled while it closes): the shard streams are closed whatever
        # happens, and only once the feeder has ended.
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())
        await to_end(self._closing)

    async def _close(self) -> None:
        # The feeder reads the shard streams: it ends before they are closed.
        feeder, self._feeder = self._feeder, None
        if feeder is not None:
            feeder.cancel()
            await asyncio.gather(feeder, return_exceptions=True)
        queued = []
        while not self._rebuilds.empty():
            queued.append(self._rebuilds.get_nowait())
        for rebuild in queued:
            rebuild.cancel()
        await asyncio.gather(*queued, return_exceptions=True)
        # A consumer in another task, waiting for the next stripe, fails instead of waiting on.
        self._rebuilds.put_nowait(_failed(InternalError("the erasure read was closed")))
        await self._reader.aclose()


def _failed(exc: BaseException) -> asyncio.Future[list[Buffer]]:
    """A stripe that failed with ``exc``, as the consumer awaits it (marked read: nobody may
    reach it once the stream is closed)."""
    future: asyncio.Future[list[Buffer]] = asyncio.get_running_loop().create_future()
    future.set_exception(exc)
    future.add_done_callback(retrieved)
    return future
