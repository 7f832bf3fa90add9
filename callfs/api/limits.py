"""Connection limits of the listeners (API.md §2, §22 "Limits"; docs/security.md "Limits").

- **Caps**: at most ``server.max_connections`` open client connections, and at most
  ``server.max_connections_per_ip`` from one client IP. A connection over a cap is closed as soon
  as it is accepted, before anything is read from it, and counted in
  ``callfs_connections_rejected_total``.
- **Write stall**: ``cut_off`` drops a connection whose client stopped taking a response.
- **Header wait**: a connection must deliver complete request headers within
  ``server.read_timeout``: from accept for its first request, and from the first byte of each
  later one. Waiting between keep-alive requests, with nothing sent yet, is not limited here
  (aiohttp's keep-alive timer closes such a connection after ``KEEPALIVE_TIMEOUT``).

aiohttp 3.14 has no header timeout (its one per-connection timer is ``keepalive_timeout``, which
trickled bytes do not reset, so it does bound the wait, but at 120 s) and no way to refuse a
connection. So the listener's protocol is ``GuardedRequestHandler``, a small ``RequestHandler``
subclass, made by ``GuardedServer``, which ``GuardedAppRunner`` puts in place of the application's
plain ``Server``. They rely on three private details of aiohttp 3.14: the handler's ``_waiter``
(set while it waits for the next request) and ``_request_count`` (requests parsed so far), and
the server's ``_kwargs`` (the handler arguments); ``test_limits.py`` fails if they change.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from callfs.api.state import api_state
from callfs.metrics import Metrics

log = logging.getLogger(__name__)


def cut_off(request: web.Request) -> None:
    """§2: a client that took no bytes of a response for ``server.write_timeout`` loses its
    connection. ``abort``, not ``close``: close would wait to flush bytes it never reads."""
    api_state(request).metrics.connections_timed_out.labels(reason="write_stall").inc()
    if request.transport is not None:
        request.transport.abort()


class ConnectionCaps:
    """Counts open connections in total and per client IP (one event loop: no locking)."""

    def __init__(self, total: int, per_ip: int) -> None:
        self.total = total
        self.per_ip = per_ip
        self._open = 0
        self._by_ip: dict[str, int] = {}

    def admit(self, ip: str) -> str | None:
        """Record a new connection from ``ip``, or return the name of the cap it would exceed."""
        if self._open >= self.total:
            return "max_connections"
        held = self._by_ip.get(ip, 0)
        if held >= self.per_ip:
            return "max_connections_per_ip"
        self._open += 1
        self._by_ip[ip] = held + 1
        return None

    def release(self, ip: str) -> None:
        self._open -= 1
        held = self._by_ip[ip] - 1
        if held:
            self._by_ip[ip] = held
        else:
            del self._by_ip[ip]


@dataclass(frozen=True, slots=True)
class ConnectionGuard:
    """What every connection of a guarded listener shares."""

    caps: ConnectionCaps
    #: ``server.read_timeout``: the longest wait for complete request headers.
    header_timeout: float
    metrics: Metrics


def peer_ip(transport: asyncio.BaseTransport) -> str | None:
    """The client IP of a TCP connection (IPv4-mapped IPv6 as IPv4); None for a unix socket,
    i.e. the HTTP/3 relay's private one, which is not capped (the relay is one local client)."""
    peer = transport.get_extra_info("peername")
    if not isinstance(peer, tuple) or not peer:
        return None
    host = str(peer[0])
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


class GuardedRequestHandler(web.RequestHandler):
    """aiohttp's HTTP/1.1 protocol with the caps and the header wait of this module."""

    __slots__ = ("_guard", "_header_timer", "_peer_ip")

    def __init__(self, manager: web.Server, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._peer_ip: str | None = None
        self._header_timer: asyncio.TimerHandle | None = None

    def eof_received(self) -> bool | None:  # type: ignore[override]  # asyncio reads it
        """A WebSocket client that half-closes (FIN) after its last frame still gets its answer
        (§9.9: after ``EOF`` the ``ok:<bytes>`` acknowledgement is always delivered): the reader
        sees the end, and the write side stays open until the handler is done. It closed at
        once, the acknowledgement lost while the upload still committed (found by audit).
        Plain HTTP, and TLS (where asyncio cannot keep half a connection), keep aiohttp's way."""
        parser = self._payload_parser
        if parser is None or not self._upgraded or self.transport is None:
            return None
        if self.transport.get_extra_info("sslcontext") is not None:
            return None
        parser.feed_eof()
        return True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        ip = peer_ip(transport)
        if ip is not None:
            refused = self._guard.caps.admit(ip)
            if refused is not None:
                self._guard.metrics.connections_rejected.labels(reason=refused).inc()
                log.debug("refused a connection from %s: %s", ip, refused)
                # aiohttp never sees this connection: without a manager, connection_lost is a no-op
                self._manager = None
                transport.close()
                return
            self._peer_ip = ip
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_header_timer()
        if self._peer_ip is not None:
            self._guard.caps.release(self._peer_ip)
            self._peer_ip = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if data and self._header_timer is None and self._awaiting_request():
            self._arm_header_timer()  # the first byte of a keep-alive connection's next request
        parsed = self._request_count
        super().data_received(data)
        if self._request_count != parsed:
            self._cancel_header_timer()  # headers complete: body stalls are the handlers' business

    def _awaiting_request(self) -> bool:
        """The connection is between requests (aiohttp's own test in its keep-alive timer)."""
        waiter = self._waiter
        return waiter is not None and not waiter.done()

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self._loop.call_later(
            self._guard.header_timeout, self._header_wait_expired
        )

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_wait_expired(self) -> None:
        self._header_timer = None
        if self.transport is None:
            return
        if self._request_count == 0 or self._awaiting_request():
            self._guard.metrics.connections_timed_out.labels(reason="header_wait").inc()
            log.debug("closing a connection from %s: no complete headers in time", self._peer_ip)
            self.force_close()


class GuardedServer(web.Server):
    """aiohttp's low-level server, making ``GuardedRequestHandler`` protocols."""

    def __init__(self, plain: web.Server, guard: ConnectionGuard) -> None:
        super().__init__(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            loop=asyncio.get_running_loop(),
            **plain._kwargs,
        )
        self._guard = guard

    def __call__(self) -> web.RequestHandler:
        return GuardedRequestHandler(self, self._guard, loop=self._loop, **self._kwargs)


class GuardedAppRunner(web.AppRunner):
    """An ``AppRunner`` whose sites serve through ``GuardedServer`` (same app, same kwargs)."""

    __slots__ = ("_guard",)

    def __init__(self, app: web.Application, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._guard = guard

    async def _make_server(self) -> web.Server:
        return GuardedServer(await super()._make_server(), self._guard)
