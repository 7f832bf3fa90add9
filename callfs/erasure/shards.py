"""Where shard bytes live (API.md §11.2): this node's shard backend under ``.erasure/<upload id>/
<index>``, or another node's, through ``/v1/internal/shards/<upload id>/<index>``.

A shard is written once (a new upload id for every version) and read in byte ranges; ``ShardIO``
hides whether it is local or remote.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import ssl
from collections.abc import AsyncIterable, AsyncIterator
from typing import Protocol

import aiohttp

from callfs.concurrency import run_cpu
from callfs.errors import (
    CallFSError,
    InsufficientStorage,
    InternalError,
    NotFound,
    PeerUnavailable,
)
from callfs.storage.base import ByteStream, Chunk, StorageBackend, publish_or_discard

log = logging.getLogger(__name__)

SHARD_PREFIX = ".erasure/"
INTERNAL_SHARDS = "/v1/internal/shards/"
_CHUNK = 256 * 1024
#: The SHA-256 of a shard its holder computed while storing it, on the 201 of an internal PUT (our
#: addition: the body stays empty, as API.md §12.6 says).
SHA256_HEADER = "X-CallFS-Shard-SHA256"
#: Bytes hashed per CPU-pool hop while a shard streams through ``hashed``.
_HASH_BATCH = 1 << 20
_PEER_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError, ssl.SSLError)


class Peers(Protocol):
    """What shard I/O needs of the node's inter-node client (``core.peer.PeerClient``)."""

    def require_endpoint(self, instance_id: str) -> str: ...

    @property
    def session(self) -> aiohttp.ClientSession: ...

    def auth_headers(self) -> dict[str, str]: ...


def shard_key(upload_id: str, index: int) -> str:
    return f"{SHARD_PREFIX}{upload_id}/{index}"


def _update(digest: hashlib._Hash, chunks: list[Chunk]) -> None:
    for chunk in chunks:
        digest.update(chunk)


async def hashed(chunks: AsyncIterable[Chunk], digest: hashlib._Hash) -> AsyncIterator[Chunk]:
    """``chunks`` unchanged, fed to ``digest`` on the CPU pool a MiB at a time (SHA-256 releases
    the GIL) while the next MiB streams on: one batch is hashed at a time, in order. The digest
    is complete once the iteration ends. Chunks must not change after they are yielded."""
    pending: list[Chunk] = []
    size = 0
    running: asyncio.Future[None] | None = None
    try:
        async for chunk in chunks:
            pending.append(chunk)
            size += len(chunk)
            if size >= _HASH_BATCH:
                if running is not None:
                    await asyncio.shield(running)  # cancelled here: the thread is waited for below
                running = asyncio.ensure_future(run_cpu(_update, digest, pending))
                pending, size = [], 0
            yield chunk
        if running is not None:
            await asyncio.shield(running)
            running = None
        if pending:
            await run_cpu(_update, digest, pending)
    finally:
        if running is not None:
            # the consumer stopped early: the digest is dropped, only wait for the thread
            await asyncio.wait([running])
            if not running.cancelled():
                running.exception()  # retrieved: nobody wants this digest any more


class _PeerShardStream:
    def __init__(self, response: aiohttp.ClientResponse, length: int) -> None:
        self._response = response
        self.length = length

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():  # as received: no joins
                yield chunk
        except _PEER_ERRORS as exc:
            raise PeerUnavailable("shard holder failed mid-transfer") from exc

    async def aclose(self) -> None:
        self._response.release()


class ShardIO:
    def __init__(self, instance_id: str, local: StorageBackend, peers: Peers | None) -> None:
        self.instance_id = instance_id
        self.local = local
        self.peers = peers

    def _url(self, holder: str, upload_id: str, index: int) -> str:
        if self.peers is None:
            raise PeerUnavailable(f"no endpoint for node {holder}")
        return f"{self.peers.require_endpoint(holder)}{INTERNAL_SHARDS}{upload_id}/{index}"

    # ---- write -------------------------------------------------------------------------------
    async def write(
        self, holder: str, upload_id: str, index: int, chunks: AsyncIterable[Chunk]
    ) -> str:
        """Store one shard durably (fsync'd / completed) on ``holder``; its SHA-256 (hex), computed
        by the holder as it stored the bytes, so each node hashes only the shards it keeps."""
        if holder == self.instance_id:
            digest = hashlib.sha256()
            key = shard_key(upload_id, index)
            await publish_or_discard(await self.local.stage(key, hashed(chunks, digest)))
            return digest.hexdigest()
        assert self.peers is not None
        url = self._url(holder, upload_id, index)
        try:
            async with self.peers.session.put(
                url, data=chunks, headers=self.peers.auth_headers()
            ) as resp:
                if resp.status != 201:
                    # reachable, but it refused: §11.2 keeps 502 for an unreachable node
                    detail = (await resp.text())[:200]
                    why = f"node {holder} refused a shard ({resp.status}): {detail}"
                    if resp.status == 507:
                        raise InsufficientStorage(why)
                    raise InternalError(why)
                checksum = resp.headers.get(SHA256_HEADER, "")
        except _PEER_ERRORS as exc:
            raise PeerUnavailable(f"node {holder} unreachable while storing a shard") from exc
        if len(checksum) == 64:
            return checksum.lower()
        return await self._read_checksum(holder, upload_id, index)  # a holder without the header

    async def _read_checksum(self, holder: str, upload_id: str, index: int) -> str:
        """The SHA-256 of a stored shard, read back from its holder (one that does not answer
        with ``SHA256_HEADER``: a node of an earlier version, during a rolling upgrade)."""
        assert self.peers is not None
        digest = hashlib.sha256()
        url = self._url(holder, upload_id, index)
        try:
            async with self.peers.session.get(url, headers=self.peers.auth_headers()) as resp:
                if resp.status != 200:
                    raise PeerUnavailable(f"node {holder} answered {resp.status} for a shard")
                async for _chunk in hashed(resp.content.iter_chunked(_CHUNK), digest):
                    pass
        except _PEER_ERRORS as exc:
            raise PeerUnavailable(f"node {holder} failed while a shard was read back") from exc
        return digest.hexdigest()

    # ---- read --------------------------------------------------------------------------------
    async def open(
        self, holder: str, upload_id: str, index: int, offset: int, length: int
    ) -> ByteStream:
        """Open ``[offset, offset+length)`` of a shard. ``NotFound`` if the holder has no such
        shard; ``PeerUnavailable`` if it cannot be asked."""
        if holder == self.instance_id:
            return await self.local.open_read(shard_key(upload_id, index), offset, length)
        assert self.peers is not None
        url = self._url(holder, upload_id, index)
        headers = self.peers.auth_headers()
        headers["Range"] = f"bytes={offset}-{offset + length - 1}" if length else "bytes=0-0"
        try:
            resp = await self.peers.session.get(url, headers=headers)
        except _PEER_ERRORS as exc:
            raise PeerUnavailable(f"node {holder} unreachable") from exc
        if resp.status in (200, 206):
            return _PeerShardStream(resp, int(resp.headers.get("Content-Length", "0")))
        resp.release()
        if resp.status in (404, 416):
            raise NotFound(f"shard {index} missing on {holder}")
        raise PeerUnavailable(f"node {holder} answered {resp.status} for a shard")

    # ---- delete ------------------------------------------------------------------------------
    async def delete(self, holder: str, upload_id: str, index: int) -> None:
        """Remove a shard, quietly: failures are logged (API.md §11.6)."""
        try:
            if holder == self.instance_id:
                await self.local.delete(shard_key(upload_id, index))
                return
            if self.peers is None:
                return
            async with self.peers.session.delete(
                self._url(holder, upload_id, index), headers=self.peers.auth_headers()
            ) as resp:
                if resp.status not in (200, 204, 404):
                    log.warning("node %s answered %s deleting a shard", holder, resp.status)
        except NotFound:
            return
        except (CallFSError, *_PEER_ERRORS) as exc:
            log.warning("could not delete shard %d on %s: %s", index, holder, type(exc).__name__)


class Pending:
    """What a shard stream delivered beyond the blocks read so far (``read_parts``)."""

    __slots__ = ("parts", "size")

    def __init__(self) -> None:
        self.parts: list[memoryview] = []
        self.size = 0


async def read_parts(it: AsyncIterator[Chunk], pending: Pending, n: int) -> list[memoryview]:
    """``n`` bytes from ``it`` as views of the chunks that carried them (no copy); fewer only at
    the end. ``pending`` keeps what was read beyond them."""
    parts = pending.parts
    while pending.size < n:
        try:
            chunk = await anext(it)
        except StopAsyncIteration:
            break
        if chunk:
            parts.append(memoryview(chunk).cast("B"))
            pending.size += len(chunk)
    out: list[memoryview] = []
    need = n
    used = 0
    for part in parts:
        if not need:
            break
        if part.nbytes <= need:
            out.append(part)
            need -= part.nbytes
            used += 1
        else:
            out.append(part[:need])
            parts[used] = part[need:]
            need = 0
    del parts[:used]
    pending.size -= n - need
    return out
