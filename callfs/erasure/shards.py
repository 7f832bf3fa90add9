"""Where shard bytes live (API.md §11.2): this node's shard backend under ``.erasure/<upload id>/
<index>``, or another node's, through ``/v1/internal/shards/<upload id>/<index>``.

A shard is written once (a new upload id for every version) and read in byte ranges; ``ShardIO``
hides whether it is local or remote.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterable, AsyncIterator
from typing import Protocol

import aiohttp

from callfs.errors import CallFSError, NotFound, PeerUnavailable
from callfs.storage.base import ByteStream, Chunk, StorageBackend

log = logging.getLogger(__name__)

SHARD_PREFIX = ".erasure/"
INTERNAL_SHARDS = "/v1/internal/shards/"
_CHUNK = 256 * 1024
_PEER_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError, ssl.SSLError)


class Peers(Protocol):
    """What shard I/O needs of the node's inter-node client (``core.peer.PeerClient``)."""

    def require_endpoint(self, instance_id: str) -> str: ...

    @property
    def session(self) -> aiohttp.ClientSession: ...

    def auth_headers(self) -> dict[str, str]: ...


def shard_key(upload_id: str, index: int) -> str:
    return f"{SHARD_PREFIX}{upload_id}/{index}"


class _PeerShardStream:
    def __init__(self, response: aiohttp.ClientResponse, length: int) -> None:
        self._response = response
        self.length = length

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_chunked(_CHUNK):
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
    ) -> None:
        """Store one shard durably (fsync'd / completed) on ``holder``."""
        if holder == self.instance_id:
            staged = await self.local.stage(shard_key(upload_id, index), chunks)
            try:
                await staged.publish()
            except BaseException:
                await staged.discard()
                raise
            return
        assert self.peers is not None
        url = self._url(holder, upload_id, index)
        try:
            async with self.peers.session.put(
                url, data=chunks, headers=self.peers.auth_headers()
            ) as resp:
                if resp.status != 201:
                    detail = (await resp.text())[:200]
                    raise PeerUnavailable(
                        f"node {holder} refused a shard ({resp.status}): {detail}"
                    )
        except _PEER_ERRORS as exc:
            raise PeerUnavailable(f"node {holder} unreachable while storing a shard") from exc

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


async def read_exactly(it: AsyncIterator[bytes], buf: bytearray, n: int) -> bytes:
    """``n`` bytes from ``it`` (``buf`` keeps what was read beyond them); fewer only at the end."""
    while len(buf) < n:
        try:
            buf += await anext(it)
        except StopAsyncIteration:
            break
    out = bytes(buf[:n])
    del buf[:n]
    return out
