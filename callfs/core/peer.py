"""Another node's bytes over its HTTP API (API.md §12.3), with the internal secret.

``PeerClient`` is the one inter-node HTTP client of a node: request forwarding (``api/proxy.py``)
and remote reads (``open_read``, used by the engine for items another node owns) both go through
it, so TLS settings live in one place."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import urllib.parse
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping

import aiohttp

from callfs.errors import (
    BadRequest,
    CallFSError,
    InsufficientShards,
    InsufficientStorage,
    InternalError,
    NotFound,
    PayloadTooLarge,
    PeerUnavailable,
    PermissionDenied,
    Unavailable,
    VersionMoved,
)
from callfs.storage.base import Chunk

log = logging.getLogger(__name__)

PROXY_TIMEOUT = 30.0
CHUNK = 256 * 1024
#: The internal endpoint a node receives another node's file bytes on (``api/internal_nodes.py``).
BLOBS_PATH = "/v1/internal/blobs"
PROBE_TIMEOUT = 2.0
#: A GET between nodes names the version it wants (its blob key; honoured with the internal
#: secret only): the owner answers 412 when its current version is another one.
EXPECT_BLOB = "X-CallFS-Expect-Blob"
#: The slowest copy between nodes a mover waits for (bytes/s) before it gives up on the owner.
MIN_MOVE_RATE = 1_000_000
_PEER_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError, ssl.SSLError)
#: The caller's user ID on a request relayed to the owner node (trusted only with the internal
#: secret): the owner checks permissions against the caller (a recursive delete checks every entry
#: of the tree there) and records the caller as the owner of what it creates, never the relaying
#: node's admin identity.
CALLER = "X-CallFS-Caller"
#: An owner's error answer to a read, relayed with its status and message (API.md §12.3).
_RELAYED: dict[str, type[CallFSError]] = {
    "BAD_REQUEST": BadRequest,
    "PERMISSION_DENIED": PermissionDenied,
    "PAYLOAD_TOO_LARGE": PayloadTooLarge,
    "INTERNAL_ERROR": InternalError,
    "UNAVAILABLE": Unavailable,
    "INSUFFICIENT_SHARDS": InsufficientShards,
    "INSUFFICIENT_STORAGE": InsufficientStorage,
}
_ERROR_BODY = 64 * 1024


async def _relayed(response: aiohttp.ClientResponse) -> CallFSError:
    """The owner's JSON error answer as the error this node answers with; ``PeerUnavailable``
    for one it does not know (a proxy or a server of another build in between)."""
    try:
        raw = b""
        while len(raw) < _ERROR_BODY:
            chunk = await response.content.read(_ERROR_BODY - len(raw))
            if not chunk:
                break
            raw += chunk
        body = json.loads(raw)
        kind = _RELAYED[body["code"]]
        message = body["message"]
    except (*_PEER_ERRORS, ValueError, KeyError, TypeError):
        return PeerUnavailable(f"owner node answered {response.status}")
    finally:
        response.release()
    if not isinstance(message, str):
        return PeerUnavailable(f"owner node answered {response.status}")
    if kind is Unavailable:
        wait = response.headers.get("Retry-After", "1")
        return Unavailable(message, int(wait) if wait.isdigit() else 1)
    return kind(message)


def url_path(engine_path: str) -> str:
    """``/a b/c`` -> ``/a%20b/c``: each segment percent-encoded for a request line."""
    return "/".join(urllib.parse.quote(seg, safe="") for seg in engine_path.split("/"))


class PeerStream:
    """A ByteStream over a peer's HTTP response body."""

    def __init__(self, response: aiohttp.ClientResponse, length: int) -> None:
        self._response = response
        self.length = length

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_chunked(CHUNK):
                yield chunk
        except _PEER_ERRORS as exc:
            raise PeerUnavailable("owner node failed mid-transfer") from exc

    async def aclose(self) -> None:
        self._response.release()


class PeerClient:
    def __init__(
        self,
        endpoints: Mapping[str, str],
        internal_secret: str,
        ssl_context: ssl.SSLContext | bool = True,
    ) -> None:
        self.endpoints = {k: v.rstrip("/") for k, v in endpoints.items()}
        self._secret = internal_secret
        self._ssl = ssl_context
        self._session: aiohttp.ClientSession | None = None
        #: Nodes learnt at run time (a Raft cluster's member table): asked when ``endpoints``
        #: does not know an ID, so a node that just joined is reachable at once.
        self.resolver: Callable[[str], str | None] | None = None

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl, limit=256),
                timeout=aiohttp.ClientTimeout(
                    total=None, connect=PROXY_TIMEOUT, sock_read=PROXY_TIMEOUT
                ),
                auto_decompress=False,
            )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def endpoint(self, instance_id: str) -> str | None:
        found = self.endpoints.get(instance_id)
        if found is None and self.resolver is not None:
            found = self.resolver(instance_id)
        return found

    def require_endpoint(self, instance_id: str) -> str:
        base = self.endpoint(instance_id)
        if base is None:
            raise PeerUnavailable("the owner node has no known endpoint")
        return base

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise PeerUnavailable("inter-node client is not running")
        return self._session

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._secret}"}

    async def open_read(
        self,
        instance_id: str,
        path: str,
        offset: int = 0,
        length: int | None = None,
        blob_key: str | None = None,
    ) -> PeerStream:
        """Stream ``[offset, offset+length)`` of a file the node ``instance_id`` owns: of the
        version whose blob is ``blob_key`` (``VersionMoved`` if the owner's current one is
        another), so the range and the headers this node sends describe the bytes it relays."""
        url = self.require_endpoint(instance_id) + "/v1/files" + url_path(path)
        headers = self.auth_headers()
        if blob_key is not None:
            headers[EXPECT_BLOB] = blob_key
        if offset or length is not None:
            last = "" if length is None else str(offset + length - 1)
            headers["Range"] = f"bytes={offset}-{last}"
        try:
            response = await self.session.get(url, headers=headers, allow_redirects=False)
        except _PEER_ERRORS as exc:
            log.warning("owner node %s unreachable: %s", instance_id, type(exc).__name__)
            raise PeerUnavailable("owner node unreachable") from exc
        if response.status in (200, 206):
            return PeerStream(response, int(response.headers.get("Content-Length", "0")))
        if response.status not in (404, 412, 416):
            raise await _relayed(response)
        response.release()
        if response.status == 404:
            raise NotFound()
        if response.status in (412, 416) and blob_key is not None:
            # 412: the owner has another version; 416 from an owner of an earlier build that
            # decided the range on its own (shorter) version first
            raise VersionMoved()
        if response.status == 416:
            return PeerStream(response, 0)
        raise PeerUnavailable(f"owner node answered {response.status}")

    async def put_file(
        self, instance_id: str, path: str, chunks: AsyncIterable[bytes], caller: str
    ) -> int:
        """Stream a new version of a file the node ``instance_id`` owns to it (a WebSocket or
        resumable upload received here) on behalf of the user ``caller``, who authorized the
        write here (if the file is gone meanwhile, the owner creates it as the caller's); the
        size stored. An error the body's own iterator raised (the client aborted, the upload
        grew too large) is raised as is, not as the owner being unreachable."""
        url = self.require_endpoint(instance_id) + "/v1/files" + url_path(path)
        size = 0
        failed: BaseException | None = None

        async def counted() -> AsyncIterator[bytes]:
            nonlocal size, failed
            try:
                async for chunk in chunks:
                    size += len(chunk)
                    yield chunk
            except BaseException as exc:
                failed = exc
                raise

        headers = {**self.auth_headers(), CALLER: caller}
        try:
            async with self.session.put(url, data=counted(), headers=headers) as resp:
                if resp.status in (200, 201):
                    await resp.read()
                    return size
                if resp.status == 404:
                    resp.release()
                    raise NotFound()
                raise await _relayed(resp)
        except _PEER_ERRORS as exc:
            if failed is not None:
                raise failed from None
            log.warning("owner node %s unreachable: %s", instance_id, type(exc).__name__)
            raise PeerUnavailable("owner node unreachable") from exc

    # ---- moves between nodes (issue 14) ------------------------------------------------------
    async def push_blob(self, instance_id: str, chunks: AsyncIterable[Chunk], size: int) -> str:
        """Stream a file's bytes to the node ``instance_id``, which stores them durably under a
        NEW blob key of its own (``POST /v1/internal/blobs``) and returns the key. No entry names
        that blob yet: if the caller never commits it, the target's orphan sweep removes it."""
        url = self.require_endpoint(instance_id) + BLOBS_PATH + f"?size={size}"
        try:
            async with self.session.post(url, data=chunks, headers=self.auth_headers()) as resp:
                status = resp.status
                raw = await resp.read()
        except _PEER_ERRORS as exc:
            log.warning("target node %s unreachable: %s", instance_id, type(exc).__name__)
            raise PeerUnavailable("target node unreachable") from exc
        if status != 201:
            raise PeerUnavailable(f"target node answered {status}: {raw[:200]!r}")
        try:
            key = json.loads(raw)["key"]
        except (ValueError, KeyError, TypeError) as exc:
            raise PeerUnavailable("target node gave no blob key") from exc
        if not isinstance(key, str):
            raise PeerUnavailable("target node gave no blob key")
        return key

    async def drop_blob(self, instance_id: str, key: str) -> None:
        """Ask ``instance_id`` to remove a blob ``push_blob`` made there that no entry names
        (it refuses a blob some entry names). Best effort: on failure its orphan sweep decides."""
        url = self.require_endpoint(instance_id) + BLOBS_PATH + "/" + key
        try:
            async with self.session.delete(url, headers=self.auth_headers()) as resp:
                await resp.read()
        except _PEER_ERRORS:
            log.warning("could not remove an uncommitted blob on %s; its sweep will", instance_id)

    async def relocate(self, owner: str, path: str, target: str, size: int) -> None:
        """Have the owner node ``owner`` move the file ``path`` (``size`` bytes) to the node
        ``target`` (a PATCH with the internal secret: the caller authorized it). The owner answers
        once the copy is committed, so the wait allows ``MIN_MOVE_RATE``. Errors:
        ``PeerUnavailable`` (owner unreachable or failed), ``NotFound``, ``CallFSError`` for
        other refusals."""
        url = self.require_endpoint(owner) + "/v1/files" + url_path(path)
        body = {"destination": path, "instance": target}
        wait = aiohttp.ClientTimeout(
            total=None, connect=PROXY_TIMEOUT, sock_read=PROXY_TIMEOUT + size / MIN_MOVE_RATE
        )
        try:
            async with self.session.patch(
                url, json=body, headers=self.auth_headers(), timeout=wait
            ) as resp:
                status = resp.status
                raw = await resp.read()
        except _PEER_ERRORS as exc:
            raise PeerUnavailable("owner node unreachable") from exc
        if status == 200:
            return
        if status == 404:
            raise NotFound()
        if status in (502, 503, 504):
            raise PeerUnavailable(f"owner node answered {status}: {raw[:200]!r}")
        raise CallFSError(f"owner node answered {status}: {raw[:200]!r}")

    async def alive(self, instance_id: str) -> bool:
        """Whether ``instance_id`` answers ``/health`` now (within ``PROBE_TIMEOUT``)."""
        base = self.endpoint(instance_id)
        if base is None:
            return False
        try:
            async with self.session.get(
                base + "/health", timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT)
            ) as resp:
                return resp.status == 200
        except (*_PEER_ERRORS, CallFSError):
            return False
