"""What the HTTP layer needs from the node, stored once on the aiohttp application."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from callfs.auth.keys import Authenticator
from callfs.core.engine import Engine
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
