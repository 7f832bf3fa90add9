"""What the HTTP layer needs from the node, stored once on the aiohttp application."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from callfs.api.ratelimit import RateLimiter
from callfs.auth.keys import Authenticator
from callfs.core.engine import Engine
from callfs.links.service import LinkService
from callfs.metrics import Metrics
from callfs.model import Identity
from callfs.storage.peer import PeerClient


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
    #: §15: link generation 100/s burst 1, downloads 10/s burst 5, per client IP, per node.
    link_limiter: RateLimiter = field(default_factory=lambda: RateLimiter(100.0, 1))
    download_limiter: RateLimiter = field(default_factory=lambda: RateLimiter(10.0, 5))


STATE = web.AppKey("callfs_state", ApiState)
IDENTITY = "callfs.identity"
REQUEST_ID = "callfs.request_id"
ROUTE = "callfs.route"


def api_state(request: web.Request) -> ApiState:
    return request.app[STATE]


def identity(request: web.Request) -> Identity:
    who = request.get(IDENTITY)
    assert isinstance(who, Identity), "authentication middleware did not run"
    return who
