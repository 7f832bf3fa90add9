"""``GET /health``: always 200, checks nothing (API.md §9.1)."""

from __future__ import annotations

from aiohttp import web

_BODY = b'{"status":"ok"}'


async def health(request: web.Request) -> web.StreamResponse:
    resp = web.Response(body=_BODY)
    resp.content_type = "application/json"
    return resp


async def metrics(request: web.Request) -> web.StreamResponse:
    """``GET /metrics`` on the main port (bearer auth by the pipeline, §9.2)."""
    from prometheus_client import CONTENT_TYPE_LATEST

    from callfs.api.state import api_state

    body = api_state(request).metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/health", health, allow_head=False)
    app.router.add_get("/metrics", metrics, allow_head=False)
