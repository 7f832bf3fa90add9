"""What the HTTP layer needs from the node, stored once on the aiohttp application."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from callfs.api.ratelimit import RateLimiter
from callfs.auth.keys import Authenticator
from callfs.core.engine import Engine
from callfs.core.peer import PeerClient
from callfs.links.service import LinkService
from callfs.metrics import Metrics
from callfs.model import Identity


@dataclass(slots=True)
class ApiState:
    engine: Engine
    auth: Authenticator
    max_upload_size: int
    instance_id: str
    external_url: str
    metrics: Metrics
    links: LinkService
    peers: PeerClient
    #: The private unix socket the HTTP/3 relay talks to (its requests came over TLS), if any.
    h3_socket: str | None = None
    #: ``Alt-Svc`` value advertised on TCP responses when QUIC is on.
    alt_svc: str | None = None
    #: §2: the longest stall allowed while reading a body / writing a response (not a total limit).
    read_timeout: float = 30.0
    write_timeout: float = 30.0
    #: §15: link generation 100/s burst 1, downloads 10/s burst 5, per client IP, per node.
    link_limiter: RateLimiter = field(default_factory=lambda: RateLimiter(100.0, 1))
    download_limiter: RateLimiter = field(default_factory=lambda: RateLimiter(10.0, 5))


STATE = web.AppKey("callfs_state", ApiState)
IDENTITY = web.RequestKey("callfs_identity", Identity)
REQUEST_ID = web.RequestKey("callfs_request_id", str)
#: An upload's ``Expect: 100-continue`` not answered yet (``files.defer_continue``).
CONTINUE_PENDING = web.RequestKey("callfs_continue_pending", bool)


def api_state(request: web.Request) -> ApiState:
    return request.app[STATE]


def identity(request: web.Request) -> Identity:
    return request[IDENTITY]


def from_h3_bridge(request: web.Request) -> bool:
    """True when the request arrived through the HTTP/3 relay's private socket."""
    return through_h3_bridge(api_state(request), request)


def through_h3_bridge(state: ApiState, request: web.BaseRequest) -> bool:
    """``from_h3_bridge`` for a request that has no route (and so no app) to ask."""
    if state.h3_socket is None or request.transport is None:
        return False
    return bool(request.transport.get_extra_info("sockname") == state.h3_socket)


def client_ip(request: web.Request) -> str:
    """The host part of the TCP peer address (§15); forwarding headers are ignored, except the
    relay's own header on its private socket."""
    if from_h3_bridge(request):
        from callfs.api.http3 import BRIDGE_CLIENT_HEADER

        return request.headers.get(BRIDGE_CLIENT_HEADER, "")
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return ""


def is_tls(request: web.Request) -> bool:
    return request.secure or from_h3_bridge(request)
