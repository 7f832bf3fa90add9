"""``build_app``: the aiohttp application of one node, from already-built components."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from callfs.api import directories, files, health, links, websocket
from callfs.api.middleware import on_response_prepare, pipeline
from callfs.api.state import STATE, ApiState
from callfs.errors import CallFSError
from callfs.links.service import SWEEP_INTERVAL

log = logging.getLogger(__name__)

#: aiohttp's own limit for buffered reads; bodies we care about are streamed and capped ourselves.
_CLIENT_MAX_SIZE = 1 << 20


def build_app(state: ApiState) -> web.Application:
    app = web.Application(middlewares=[pipeline], client_max_size=_CLIENT_MAX_SIZE)
    app[STATE] = state
    app.on_response_prepare.append(on_response_prepare)
    health.add_routes(app)
    websocket.add_routes(app)
    files.add_routes(app)
    directories.add_routes(app)
    links.add_routes(app)
    app.cleanup_ctx.append(_link_sweeper)
    return app


async def _link_sweeper(app: web.Application) -> AsyncIterator[None]:
    """Owns the background task that removes expired and old used links every 5 minutes."""
    task = asyncio.create_task(_sweep_forever(app[STATE]), name="callfs-link-sweeper")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _sweep_forever(state: ApiState) -> None:
    while True:
        try:
            await state.links.sweep()
        except CallFSError:
            log.warning("link sweep failed; retrying at the next interval", exc_info=True)
        await asyncio.sleep(SWEEP_INTERVAL)
