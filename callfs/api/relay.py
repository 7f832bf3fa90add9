"""A worker process's side of ``server.workers`` (docs/workers.md): the routes whose state lives in
one process per node are relayed, body streaming both ways, to the node's primary process over
its private unix socket.

Relayed: ``/metrics`` and ``/v1/status`` (the node's merged figures), link generation and
downloads (§15: one set of rate-limit buckets per node), resumable uploads (one appender per
upload) and the internal endpoints other nodes and the CLI call (jobs, fsck, repair), except the
shard endpoints, which only touch this node's disk. Everything else is served by the worker
itself. A relayed request skips the worker's pipeline: the primary authenticates, counts and logs
it once, trusting the client address and TLS flag that the relay sets on the private socket.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler
from multidict import CIMultiDict

from callfs.api.errors import error_response
from callfs.api.files import send_continue
from callfs.api.state import BRIDGE_CLIENT_HEADER, BRIDGE_TLS_HEADER, client_ip

log = logging.getLogger(__name__)

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
        "te",
        "trailer",
    }
)
#: Request headers a relay must not pass on: hop-by-hop ones, ``Expect`` (the relay asks for
#: ``100 Continue`` itself) and the relays' own trusted headers, which a client may not set.
_DROPPED = HOP_BY_HOP | {"expect", BRIDGE_CLIENT_HEADER.lower(), BRIDGE_TLS_HEADER.lower()}
_EXACT = frozenset({"/metrics", "/v1/status", "/v1/links/generate", "/v1/uploads"})
_PREFIXES = ("/download/", "/v1/uploads/", "/v1/internal/")
#: Served by every worker: shard reads and writes only touch this node's disk.
_LOCAL_INTERNAL = "/v1/internal/shards/"
#: The primary's wake-up call for its work-queue worker (a worker process queued a copy).
WAKE_PATH = "/v1/internal/workers/wake"
_CHUNK = 256 * 1024


def relayed(raw_path: str) -> bool:
    """Whether a worker process hands this request path to the primary process. Never the
    primary's wake-up call: that is for worker processes, not for clients (404 from a worker)."""
    if raw_path in _EXACT:
        return True
    if raw_path == WAKE_PATH:
        return False
    return raw_path.startswith(_PREFIXES) and not raw_path.startswith(_LOCAL_INTERNAL)


class PrimaryRelay:
    """The connection pool to the primary's private socket, and the middleware that uses it."""

    def __init__(self, socket_path: str) -> None:
        self._socket_path = socket_path
        self._session: aiohttp.ClientSession | None = None
        self._wake_task: asyncio.Task[None] | None = None
        self._wake_again = False

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=self._socket_path, limit=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5.0),
            auto_decompress=False,
            skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
        )

    async def close(self) -> None:
        if self._wake_task is not None:
            self._wake_task.cancel()
        if self._session is not None:
            await self._session.close()
            self._session = None

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not relayed(request.rel_url.raw_path):
            return await handler(request)
        return await self.forward(request)

    async def forward(self, request: web.Request) -> web.StreamResponse:
        session = self._session
        if session is None:
            return error_response(503, "UNAVAILABLE", "the node is shutting down")
        headers: CIMultiDict[str] = CIMultiDict(
            (name, value) for name, value in request.headers.items() if name.lower() not in _DROPPED
        )
        headers[BRIDGE_CLIENT_HEADER] = client_ip(request)
        headers[BRIDGE_TLS_HEADER] = "1" if request.secure else "0"
        expect = request.headers.get("Expect", "").lower() == "100-continue"

        async def body() -> AsyncIterator[bytes]:
            await send_continue(request)  # the primary asked for the body: so does the client
            async for chunk in request.content.iter_any():
                yield chunk

        try:
            upstream = await session.request(
                request.method,
                "http://callfs-primary" + request.rel_url.raw_path_qs,
                headers=headers,
                data=body() if request.body_exists else None,
                expect100=expect and request.body_exists,
                allow_redirects=False,
            )
        except aiohttp.ClientError as exc:
            log.warning("relay to the primary process failed: %s", exc)
            return error_response(503, "UNAVAILABLE", "the node's primary process is not reachable")
        async with upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for name, value in upstream.headers.items():
                if name.lower() not in HOP_BY_HOP:
                    response.headers.add(name, value)
            if upstream.headers.get("Connection", "").lower() == "close":
                response.force_close()
            await response.prepare(request)
            if request.method != "HEAD":
                async for chunk in upstream.content.iter_chunked(_CHUNK):
                    await response.write(chunk)
            await response.write_eof()
            return response

    def wake(self) -> None:
        """Tell the primary's work-queue worker that this process queued work (coalesced)."""
        if self._wake_task is not None and not self._wake_task.done():
            self._wake_again = True
            return
        self._wake_task = asyncio.get_running_loop().create_task(self._send_wakes())

    async def _send_wakes(self) -> None:
        while True:
            self._wake_again = False
            session = self._session
            if session is None:
                return
            try:
                async with session.post("http://callfs-primary" + WAKE_PATH) as resp:
                    await resp.read()
            except aiohttp.ClientError as exc:  # the poll finds the work anyway, a little later
                log.debug("work-queue wake-up not delivered: %s", exc)
            if not self._wake_again:
                return
