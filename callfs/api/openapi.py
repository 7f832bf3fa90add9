"""``GET /openapi.json`` (API.md §22): the OpenAPI 3.1 document of every public route, shipped
inside the package (``callfs/api/openapi.json``) and served without authentication."""

from __future__ import annotations

import functools
import json
from importlib import resources

from aiohttp import web

ROUTE = "/openapi.json"


@functools.cache
def document_bytes() -> bytes:
    """The shipped document, re-serialised compact (API.md §1), read once."""
    text = resources.files("callfs.api").joinpath("openapi.json").read_text(encoding="utf-8")
    return json.dumps(json.loads(text), separators=(",", ":"), ensure_ascii=False).encode()


async def openapi(request: web.Request) -> web.StreamResponse:
    resp = web.Response(body=document_bytes())
    resp.content_type = "application/json"
    return resp


def add_routes(app: web.Application) -> None:
    app.router.add_get(ROUTE, openapi, allow_head=False)
