"""One body into two backends at once: the primary blob and its HA replica copy (API.md §13,
``ha.require_replica_success``), so the replica is written from the bytes as they arrive instead of
re-reading the primary after the commit.

The primary decides: its failure fails the store (and the replica copy is removed); a replica
failure only stops the copy (the caller then copies the usual way after the commit, which fails
the request as the contract says, the primary write standing). Both sides are fed through bounded
queues, so memory stays at a few chunks whatever the file size and the slower side paces the body.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterable, AsyncIterator

from callfs.concurrency import put_unless_done
from callfs.errors import CallFSError, NotFound
from callfs.storage.base import StagedObject, StorageBackend, publish_or_discard

log = logging.getLogger(__name__)

_DEPTH = 2


class _Side:
    """One destination: a bounded queue drained by ``backend.stage`` then ``publish``."""

    def __init__(self, backend: StorageBackend, key: str) -> None:
        self.backend = backend
        self.key = key
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue(_DEPTH)
        self.task: asyncio.Future[StagedObject] = asyncio.ensure_future(self._store())

    async def _chunks(self) -> AsyncIterator[bytes]:
        while (chunk := await self._queue.get()) is not None:
            yield chunk

    async def _store(self) -> StagedObject:
        return await publish_or_discard(await self.backend.stage(self.key, self._chunks()))

    async def send(self, chunk: bytes | None) -> bool:
        """Queue ``chunk`` (None: the end); False if the side already stopped (failed)."""
        return await put_unless_done(self._queue, chunk, self.task)

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def store_with_copy(
    primary: StorageBackend,
    key: str,
    replica: StorageBackend,
    replica_key: str,
    chunks: AsyncIterable[bytes],
) -> tuple[StagedObject, bool]:
    """Store ``chunks`` durably under ``key`` on ``primary`` and, alongside, under
    ``replica_key`` on ``replica``. Returns the primary's staged object (published) and whether
    the replica copy is complete and durable too. Raises what the primary raised."""
    main, copy = _Side(primary, key), _Side(replica, replica_key)

    async def abandon() -> None:
        """Stop both sides and remove what they stored: the primary if it got published (the
        stop came too late), and whatever stands under the replica key, which is this upload's
        own (``key`` is new): a finished copy, or a publish interrupted after its rename."""
        await main.stop()
        await copy.stop()
        if main.task.done() and not main.task.cancelled() and main.task.exception() is None:
            await _remove(primary, key)
        await _remove(replica, replica_key)

    copying = True
    try:
        async for chunk in chunks:
            if not await main.send(chunk):
                break  # the primary failed: its exception is raised below
            if copying:
                copying = await copy.send(chunk)
        else:
            await main.send(None)
            if copying:
                await copy.send(None)
        staged = await main.task
    except BaseException:
        await abandon()
        raise
    try:
        await copy.task
    except asyncio.CancelledError:
        # The caller was cancelled (a shutdown, a failing erasure or replicated write around
        # it) with the primary published: nothing will name either copy.
        await abandon()
        raise
    except Exception as exc:  # the copy never fails the primary: it is retried after the commit
        log.warning("replica copy during the upload failed (%s); copying after the commit", exc)
        return staged, False
    return staged, True


async def _remove(backend: StorageBackend, key: str) -> None:
    with contextlib.suppress(NotFound):
        try:
            await backend.delete(key)
        except (CallFSError, OSError):
            log.warning("could not remove an unreferenced copy; the orphan sweep retries it")
