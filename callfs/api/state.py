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
    #: The private unix socket this node's other worker processes relay requests to
    #: (``callfs.workers``); set on the primary process only.
    worker_socket: str | None = None
    #: ``Alt-Svc`` value advertised on TCP responses when QUIC is on.
    alt_svc: str | None = None
    #: §2: the longest stall allowed while reading a body / writing a response (not a total limit).
    read_timeout: float = 30.0
    write_timeout: float = 30.0
    #: §15: link generation 100/s burst 1, downloads 10/s burst 5, per client IP, per node.
    link_limiter: RateLimiter = field(default_factory=lambda: RateLimiter(100.0, 1))
    download_limiter: RateLimiter = field(default_factory=lambda: RateLimiter(10.0, 5))
    #: Requests in progress (``middleware.in_flight``): a stopping node waits for them while
    #: their connections still read (``Node._drain``), refusing new ones (``draining``).
    active: int = 0
    draining: bool = False


STATE = web.AppKey("callfs_state", ApiState)
IDENTITY = web.RequestKey("callfs_identity", Identity)
REQUEST_ID = web.RequestKey("callfs_request_id", str)
#: An upload's ``Expect: 100-continue`` not answered yet (``files.defer_continue``).
CONTINUE_PENDING = web.RequestKey("callfs_continue_pending", bool)


def api_state(request: web.Request) -> ApiState:
    return request.app[STATE]


def identity(request: web.Request) -> Identity:
    return request[IDENTITY]


#: Set by a relay (HTTP/3, or another worker process of this node) on its private socket only:
#: the client's address, and whether its connection was TLS. Never trusted from anywhere else.
BRIDGE_CLIENT_HEADER = "X-CallFS-H3-Client"
BRIDGE_TLS_HEADER = "X-CallFS-Relay-TLS"


def bridge_of(state: ApiState, request: web.BaseRequest) -> str | None:
    """``"h3"`` or ``"worker"`` when the request came over that relay's private socket, else
    None (a client's own TCP connection). Works for a request that has no route yet."""
    if request.transport is None or (state.h3_socket is None and state.worker_socket is None):
        return None
    sockname = request.transport.get_extra_info("sockname")
    if not isinstance(sockname, str) or not sockname:
        return None
    if sockname == state.h3_socket:
        return "h3"
    if sockname == state.worker_socket:
        return "worker"
    return None


def tls_of(state: ApiState, request: web.BaseRequest) -> bool:
    """Whether the client's own connection is TLS: HTTP/3 always is; a request relayed by
    another worker carries its connection's answer."""
    bridge = bridge_of(state, request)
    if bridge is None:
        return request.secure
    return bridge == "h3" or request.headers.get(BRIDGE_TLS_HEADER) == "1"


def client_ip(request: web.Request) -> str:
    """The host part of the TCP peer address (§15); forwarding headers are ignored, except the
    relays' own header on their private sockets."""
    if bridge_of(api_state(request), request) is not None:
        return request.headers.get(BRIDGE_CLIENT_HEADER, "")
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return ""


def is_tls(request: web.Request) -> bool:
    return tls_of(api_state(request), request)


def client_gone(request: web.Request) -> bool:
    """The client of ``request`` hung up (its connection closed or closing)."""
    transport = request.transport
    return transport is None or transport.is_closing()
