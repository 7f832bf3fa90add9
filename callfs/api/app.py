"""``build_app``: the aiohttp application of one node, from already-built components."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Middleware

from callfs.api import directories, files, health, links, openapi, protocol_errors, websocket
from callfs.api import status as status_api
from callfs.api import ui as ui_api
from callfs.api.middleware import in_flight, on_response_prepare, pipeline
from callfs.api.state import STATE, ApiState

log = logging.getLogger(__name__)

#: aiohttp's own limit for buffered reads; bodies we care about are streamed and capped ourselves.
_CLIENT_MAX_SIZE = 1 << 20


def build_app(state: ApiState, relay: Middleware | None = None) -> web.Application:
    """``relay``: a worker process's hand-off to its primary (``api.relay``), run before all."""
    middlewares = [in_flight, pipeline] if relay is None else [in_flight, relay, pipeline]
    app = web.Application(middlewares=middlewares, client_max_size=_CLIENT_MAX_SIZE)
    app[STATE] = state
    app.on_response_prepare.append(on_response_prepare)
    protocol_errors.install(app)
    health.add_routes(app, state.metrics)
    websocket.add_routes(app)
    files.add_routes(app)
    directories.add_routes(app)
    links.add_routes(app)
    openapi.add_routes(app)
    status_api.add_routes(app)
    ui_api.add_routes(app)
    return app
