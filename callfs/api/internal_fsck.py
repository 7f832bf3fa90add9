"""fsck over HTTP, between nodes and for ``callfs fsck`` (internal secret only, JSON both ways):

- ``POST /v1/internal/fsck`` ``{"repair": bool, "grace": seconds?}``: this node coordinates a
  cluster-wide check (``Fsck.run``) and answers the report;
- ``POST /v1/internal/fsck/local`` ``{"repair": bool, "grace": seconds, "shared": bool}``: this
  node's findings on its own backends (``Fsck.scan_local``);
- ``POST /v1/internal/fsck/stat`` ``{"items": [[backend, key], ...]}``: ``{"sizes": [n|null]}``,
  the size of each key on this node (``backend`` ``shards``: the node's shard backend).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from callfs.api.errors import status_and_code
from callfs.api.state import api_state
from callfs.core.engine import ORPHAN_GRACE
from callfs.core.fsck import Fsck
from callfs.errors import CallFSError

FSCK = web.AppKey("callfs_fsck", Fsck)
#: Keys one ``stat`` request may name.
MAX_STAT_ITEMS = 10_000


class _Invalid(ValueError):
    pass


async def _body(request: web.Request) -> dict[str, Any]:
    raw = await request.content.read(1 << 24)
    try:
        body = json.loads(raw or b"{}")
    except ValueError as exc:
        raise _Invalid("body is not JSON") from exc
    if not isinstance(body, dict):
        raise _Invalid("body must be a JSON object")
    return body


def _options(body: dict[str, Any]) -> tuple[bool, float]:
    repair = body.get("repair", False)
    grace = body.get("grace")
    if not isinstance(repair, bool):
        raise _Invalid("repair must be true or false")
    if grace is None:
        return repair, ORPHAN_GRACE
    if isinstance(grace, bool) or not isinstance(grace, int | float) or grace < 0:
        raise _Invalid("grace must be a number of seconds >= 0")
    return repair, float(grace)


_Handler = Callable[[Fsck, dict[str, Any]], Awaitable[dict[str, Any]]]


def _guarded(handler: _Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        if not api_state(request).auth.is_internal(request.headers.get("Authorization")):
            return web.json_response({"error": "unauthorized"}, status=401)
        try:
            body = await _body(request)
            return web.json_response(await handler(request.app[FSCK], body))
        except _Invalid as exc:
            return web.json_response({"error": f"invalid request: {exc}"}, status=400)
        except CallFSError as exc:  # the store down: a 503 the CLI can say, not a bare 500
            status, _code = status_and_code(exc)
            return web.json_response({"error": exc.message}, status=status)

    return wrapped


async def _run(fsck: Fsck, body: dict[str, Any]) -> dict[str, Any]:
    repair, grace = _options(body)
    return await fsck.run(repair, grace)


async def _local(fsck: Fsck, body: dict[str, Any]) -> dict[str, Any]:
    repair, grace = _options(body)
    shared = body.get("shared", True)
    if not isinstance(shared, bool):
        raise _Invalid("shared must be true or false")
    return (await fsck.scan_local(repair, grace, shared)).as_dict()


async def _stat(fsck: Fsck, body: dict[str, Any]) -> dict[str, Any]:
    items = body.get("items")
    if not isinstance(items, list) or len(items) > MAX_STAT_ITEMS:
        raise _Invalid(f"items must be a list of at most {MAX_STAT_ITEMS} [backend, key] pairs")
    pairs: list[tuple[str, str]] = []
    for item in items:
        if not (
            isinstance(item, list) and len(item) == 2 and all(isinstance(x, str) for x in item)
        ):
            raise _Invalid("each item must be [backend, key]")
        pairs.append((item[0], item[1]))
    return {"sizes": await fsck.stat_keys(pairs)}


def add_routes(app: web.Application, fsck: Fsck) -> None:
    app[FSCK] = fsck
    app.router.add_post("/v1/internal/fsck", _guarded(_run))
    app.router.add_post("/v1/internal/fsck/local", _guarded(_local))
    app.router.add_post("/v1/internal/fsck/stat", _guarded(_stat))
