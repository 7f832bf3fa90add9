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
from yarl import URL

from callfs.api.errors import error_response
from callfs.api.files import send_continue
from callfs.api.middleware import unavailable_early
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
#: Route templates (aiohttp resource ``canonical``) relayed to the primary, besides the internal
#: ones. Deciding on the matched route, not on the raw path, means that a path spelled with
#: escapes (``/v1/link%73/generate``) is relayed exactly when the route it reaches is.
_RELAYED = frozenset(
    {
        "/metrics",
        "/v1/status",
        "/v1/links/generate",
        "/download/{token}",
        "/v1/uploads",
        "/v1/uploads/{upload_id}",
    }
)
_INTERNAL = "/v1/internal/"
#: Served by every worker: shard reads and writes only touch this node's disk.
_LOCAL_INTERNAL = "/v1/internal/shards/"
#: The primary's wake-up call for its work-queue worker (a worker process queued a copy).
WAKE_PATH = "/v1/internal/workers/wake"
_CHUNK = 256 * 1024


def relayed(route: str | None) -> bool:
    """Whether a worker process hands a request that matched ``route`` (a resource's canonical
    template; None for no route: a 404 or 405 the worker answers) to the primary. A worker has
    no route for the primary's wake-up call, so a client never reaches that."""
    if route is None:
        return False
    if route in _RELAYED:
        return True
    return route.startswith(_INTERNAL) and not route.startswith(_LOCAL_INTERNAL)


def route_of(request: web.Request) -> str | None:
    resource = request.match_info.route.resource
    return None if resource is None else resource.canonical


class PrimaryRelay:
    """The connection pool to the primary's private socket, and the middleware that uses it."""

    def __init__(self, socket_path: str, max_connections: int) -> None:
        self._socket_path = socket_path
        #: The primary does not cap connections on its private socket: the relay does, at the
        #: cap one process has for its clients (``server.max_connections``).
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._wake_task: asyncio.Task[None] | None = None
        self._wake_again = False

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=self._socket_path, limit=self._max_connections),
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
        if not relayed(route_of(request)):
            return await handler(request)
        return await self.forward(request)

    async def forward(self, request: web.Request) -> web.StreamResponse:
        session = self._session
        if session is None:
            return unavailable_early("the node is shutting down")
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
                # As received, escapes and all: yarl must not normalise it (``%2E%2E``).
                URL("http://callfs-primary" + request.rel_url.raw_path_qs, encoded=True),
                headers=headers,
                data=body() if request.body_exists else None,
                expect100=expect and request.body_exists,
                allow_redirects=False,
            )
        except aiohttp.ClientError as exc:
            if request.transport is None or request.transport.is_closing():
                log.debug("relayed request ended: the client went away (%s)", exc)
                gone = error_response(400, "BAD_REQUEST", "the request ended early")
                gone.force_close()  # nobody reads it: aiohttp drops the write quietly
                return gone
            log.warning("relay to the primary process failed: %s", exc)
            return unavailable_early("the node's primary process is not reachable")
        async with upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for name, value in upstream.headers.items():
                if name.lower() not in HOP_BY_HOP:
                    response.headers.add(name, value)
            if upstream.headers.get("Connection", "").lower() == "close":
                response.force_close()
            await response.prepare(request)
            if request.method != "HEAD":
                try:
                    async for chunk in upstream.content.iter_chunked(_CHUNK):
                        await response.write(chunk)
                except aiohttp.ClientError as exc:
                    # The primary's answer broke off: the client sees the connection close
                    # before the promised length (or the last chunk), never a short body as whole.
                    log.warning("relayed response from the primary broke off: %s", exc)
                    response.force_close()
                    return response
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
