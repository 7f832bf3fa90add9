"""``GET /v1/directories/{path}`` (API.md §9.10)."""

from __future__ import annotations

from aiohttp import web

from callfs.api.errors import json_response
from callfs.api.files import ANY_TAIL, entry_json, request_path
from callfs.api.state import api_state, identity

PREFIX = "/v1/directories"
DEFAULT_MAX_DEPTH = 100
MAX_MAX_DEPTH = 1000


def parse_max_depth(raw: str | None) -> int:
    """Missing, unparsable or negative means 100; above 1000 means 1000; 0 is allowed."""
    if raw is None:
        return DEFAULT_MAX_DEPTH
    try:
        value = int(raw.strip())
    except ValueError:
        return DEFAULT_MAX_DEPTH
    if value < 0:
        return DEFAULT_MAX_DEPTH
    return min(value, MAX_MAX_DEPTH)


async def list_directory(request: web.Request) -> web.StreamResponse:
    path = request_path(request, PREFIX)
    query = request.rel_url.query
    recursive = query.get("recursive") == "true"
    max_depth = parse_max_depth(query.get("max_depth"))
    entry, items = await api_state(request).engine.list_directory(
        identity(request), path, recursive, max_depth
    )
    body: dict[str, object] = {"path": entry.path, "type": "directory", "recursive": recursive}
    if recursive and max_depth != 0:
        body["max_depth"] = max_depth
    body["count"] = len(items)
    body["items"] = [entry_json(item) for item in items]
    headers = {
        "X-CallFS-Type": "directory",
        "X-CallFS-Count": str(len(items)),
        "X-CallFS-Recursive": "true" if recursive else "false",
    }
    return json_response(body, headers=headers)


def add_routes(app: web.Application) -> None:
    for pattern in (PREFIX, PREFIX + ANY_TAIL):
        app.router.add_get(pattern, list_directory, allow_head=False)
