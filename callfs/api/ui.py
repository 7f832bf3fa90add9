"""``/ui/``: the web interface (``docs/ui.md``): static files shipped inside the package
(``callfs/ui/``, package data) and served without authentication; the page itself asks for an API
key and sends it only in ``Authorization`` headers. No build step: the files are served as they
are in the tree."""

from __future__ import annotations

import functools
from importlib import resources

from aiohttp import web

PREFIX = "/ui"
#: The only files served, with their content types (anything else under ``/ui/`` is 404).
FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}


@functools.cache
def asset(name: str) -> bytes:
    """One shipped file, read once (they are a few kilobytes)."""
    return resources.files("callfs").joinpath("ui").joinpath(name).read_bytes()


def _send(name: str) -> web.Response:
    resp = web.Response(body=asset(name))
    resp.headers["Content-Type"] = FILES[name]
    # revalidated on every load: an upgraded node never serves a stale page against a newer API
    resp.headers["Cache-Control"] = "no-cache"
    return resp


async def redirect(request: web.Request) -> web.StreamResponse:
    # a response, not ``raise HTTPPermanentRedirect``: the pipeline turns raised HTTP errors into
    # JSON error bodies
    return web.Response(status=308, headers={"Location": PREFIX + "/"})


async def index(request: web.Request) -> web.StreamResponse:
    return _send("index.html")


async def static(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if name not in FILES:
        raise web.HTTPNotFound()
    return _send(name)


def add_routes(app: web.Application) -> None:
    app.router.add_get(PREFIX, redirect, allow_head=False)
    app.router.add_get(PREFIX + "/", index, allow_head=False)
    app.router.add_get(PREFIX + "/{name}", static, allow_head=False)
