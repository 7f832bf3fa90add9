"""Forward a public request to the node that owns the item (API.md §12.3).

The receiving node has already authenticated and authorized the caller; the owner is called with the
internal secret and treats the call as an admin's. Bodies stream both ways; the owner's answer
(status, contract headers, body) is relayed as is."""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator, Mapping, Sequence

import aiohttp
from aiohttp import web
from yarl import URL

from callfs.core.peer import PeerClient
from callfs.errors import PeerUnavailable

log = logging.getLogger(__name__)

_FORWARDED_REQUEST_HEADERS = ("Content-Type", "Range", "If-Range")
#: A body the receiving node already read (a PATCH's JSON) is kept here and forwarded as is.
BODY_READ = web.RequestKey("callfs_body_read", bytes)
_RELAYED_RESPONSE_HEADERS = (
    "Content-Type",
    "Content-Length",
    "Content-Range",
    "Accept-Ranges",
    "Retry-After",
    "X-CallFS-Type",
    "X-CallFS-Size",
    "X-CallFS-Mode",
    "X-CallFS-Owner",
    "X-CallFS-MTime",
    "X-CallFS-Instance-ID",
)


async def forward(
    peers: PeerClient,
    request: web.Request,
    instance_id: str,
    *,
    extra_request: Sequence[str] = (),
    extra_response: Sequence[str] = (),
    set_headers: Mapping[str, str] | None = None,
) -> web.StreamResponse:
    """Relay ``request`` to the owner ``instance_id`` and stream its answer back. ``extra_request``
    / ``extra_response`` name more headers to pass on each way (a route's own protocol headers);
    ``set_headers`` are added to the forwarded request."""
    base = peers.require_endpoint(instance_id)
    headers = peers.auth_headers()
    for name in (*_FORWARDED_REQUEST_HEADERS, *extra_request):
        if name in request.headers:
            headers[name] = request.headers[name]
    if set_headers:
        headers.update(set_headers)
    body: AsyncIterator[bytes] | bytes | None = None
    if BODY_READ in request:
        body = request[BODY_READ]  # consumed here already: send exactly those bytes
    elif request.method in ("POST", "PUT", "PATCH") and request.can_read_body:
        body = request.content.iter_any()
        if "Content-Length" in request.headers:
            headers["Content-Length"] = request.headers["Content-Length"]
    # as the client wrote it (encoded): the owner canonicalises it as this node did; a URL
    # parsed again here resolves dot segments by RFC 3986 (a//../b is a/b there, /b here)
    url = URL(base + request.rel_url.raw_path_qs, encoded=True)
    try:
        upstream = await peers.session.request(
            request.method, url, headers=headers, data=body, allow_redirects=False
        )
    except (TimeoutError, aiohttp.ClientError, OSError, ssl.SSLError) as exc:
        log.warning("owner node %s unreachable: %s", instance_id, type(exc).__name__)
        raise PeerUnavailable("owner node unreachable") from exc
    try:
        out_headers = {
            k: upstream.headers[k]
            for k in (*_RELAYED_RESPONSE_HEADERS, *extra_response)
            if k in upstream.headers
        }
        if request.method == "HEAD":
            out_headers.setdefault("X-CallFS-Instance-ID", instance_id)
            return web.Response(status=upstream.status, headers=out_headers)
        resp = web.StreamResponse(status=upstream.status, headers=out_headers)
        await resp.prepare(request)
    except (TimeoutError, aiohttp.ClientError) as exc:
        upstream.release()
        raise PeerUnavailable("owner node failed") from exc
    try:
        async for chunk in upstream.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
    except (TimeoutError, aiohttp.ClientError):
        # Headers are gone already: cut the connection so the client sees a short body,
        # never a wrong one.
        log.warning("owner node %s failed mid-transfer", instance_id)
        if request.transport is not None:
            request.transport.close()
    finally:
        upstream.release()
    return resp
