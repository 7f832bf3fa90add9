"""``GET /health``: always 200, checks nothing (API.md §9.1)."""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST

from callfs.metrics import Metrics

_BODY = b'{"status":"ok"}'


async def health(request: web.Request) -> web.StreamResponse:
    resp = web.Response(body=_BODY)
    resp.content_type = "application/json"
    return resp


def metrics_handler(metrics: Metrics) -> Handler:
    """The one ``/metrics`` handler: on the main port (bearer auth by the pipeline, §9.2) and on
    the optional ``metrics.listen_addr`` listener."""

    async def serve(request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=await metrics.node_exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    return serve


def add_routes(app: web.Application, metrics: Metrics) -> None:
    app.router.add_get("/health", health, allow_head=False)
    app.router.add_get("/metrics", metrics_handler(metrics), allow_head=False)
