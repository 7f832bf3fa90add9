"""Forward a public request to the node that owns the item (API.md §12.3).

The receiving node has already authenticated and authorized the caller; the owner is called with the
internal secret and treats the call as an admin's. Bodies stream both ways; the owner's answer
(status, contract headers, body) is relayed as is. Every inter-node client goes through
``PeerClient`` so TLS settings live in one place."""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator, Mapping

import aiohttp
from aiohttp import web

from callfs.errors import PeerUnavailable

log = logging.getLogger(__name__)

PROXY_TIMEOUT = 30.0
_FORWARDED_REQUEST_HEADERS = ("Content-Type", "Content-Length", "Range", "If-Range")
_RELAYED_RESPONSE_HEADERS = (
    "Content-Type",
    "Content-Length",
    "Content-Range",
    "Accept-Ranges",
    "Content-Disposition",
    "Retry-After",
    "X-CallFS-Type",
    "X-CallFS-Size",
    "X-CallFS-Mode",
    "X-CallFS-Owner",
    "X-CallFS-MTime",
    "X-CallFS-Instance-ID",
    "X-CallFS-Count",
    "X-CallFS-Recursive",
)


class PeerClient:
    """One aiohttp client session for all inter-node traffic of this node."""

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
        return self.endpoints.get(instance_id)

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise PeerUnavailable("inter-node client is not running")
        return self._session

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._secret}"}

    async def forward(self, request: web.Request, instance_id: str) -> web.StreamResponse:
        """Relay ``request`` to the owner ``instance_id`` and stream its answer back."""
        base = self.endpoint(instance_id)
        if base is None:
            raise PeerUnavailable("the owner node has no known endpoint")
        headers = self.auth_headers()
        for name in _FORWARDED_REQUEST_HEADERS:
            if name in request.headers:
                headers[name] = request.headers[name]
        body: AsyncIterator[bytes] | None = None
        if request.method in ("POST", "PUT", "PATCH") and request.can_read_body:
            body = request.content.iter_any()
        url = base + request.rel_url.raw_path_qs
        try:
            upstream = await self.session.request(
                request.method, url, headers=headers, data=body, allow_redirects=False
            )
        except (TimeoutError, aiohttp.ClientError, OSError, ssl.SSLError) as exc:
            log.warning("owner node %s unreachable: %s", instance_id, type(exc).__name__)
            raise PeerUnavailable("owner node unreachable") from exc
        try:
            out_headers = {
                k: upstream.headers[k] for k in _RELAYED_RESPONSE_HEADERS if k in upstream.headers
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
