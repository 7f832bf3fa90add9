"""``GET /v1/directories/{path}`` (API.md §9.10), paged with ``limit``/``after`` (§22).

Paging: ``limit`` is an integer 1..10000; ``after`` is a cursor (a ``next`` value) or the plain
name of the last item seen. Names are unique in a directory, so a plain name stands for the child
of that name and its type; a name no child has any more is taken as a file's name, so paging on
never skips an entry (at worst, directories are listed again). ``after`` without ``limit`` is 400.
"""

from __future__ import annotations

from aiohttp import web

from callfs.api.errors import dumps, json_response
from callfs.api.files import (
    ANY_TAIL,
    LISTING_PAGE,
    encode_cursor,
    entry_json,
    listing_chunks,
    parse_page_query,
    request_path,
    send_listing,
)
from callfs.api.numbers import parse_int
from callfs.api.state import api_state, identity
from callfs.errors import BadRequest

PREFIX = "/v1/directories"
DEFAULT_MAX_DEPTH = 100
MAX_MAX_DEPTH = 1000


def parse_max_depth(raw: str | None) -> int:
    """Missing, unparsable or negative means 100; above 1000 means 1000; 0 is allowed.
    Parsed as v1 parsed it (``numbers.parse_int``: ``-0`` is 0; `` 1`` is unparsable)."""
    value = None if raw is None else parse_int(raw)
    if value is None or value < 0:
        return DEFAULT_MAX_DEPTH
    return min(value, MAX_MAX_DEPTH)


async def list_directory(request: web.Request) -> web.StreamResponse:
    """§9.10; with ``limit``, one page and ``next`` (§22). Without it, a direct listing longer
    than ``LISTING_PAGE`` streams from the store a page at a time: the same bytes as the v1 body,
    sent chunked (no ``Content-Length``). ``count`` and ``X-CallFS-Count`` must precede the items,
    so they come from an index count taken when the stream starts; the pages are not a snapshot,
    so under concurrent changes to that directory the items may differ from that count. Recursive
    listings are built in memory as before and cannot be paged (400)."""
    path = request_path(request, PREFIX)
    query = request.rel_url.query
    recursive = query.get("recursive") == "true"
    max_depth = parse_max_depth(query.get("max_depth"))
    page = parse_page_query(query)
    deep = recursive and max_depth > 0
    if page is not None and deep:
        raise BadRequest("limit is not supported on recursive listings")
    engine = api_state(request).engine
    limit, after = (LISTING_PAGE, None) if page is None else page
    if deep:
        entry, items = await engine.list_directory(identity(request), path, recursive, max_depth)
        more = False
    else:
        entry, items = await engine.list_directory(
            identity(request), path, recursive, max_depth, after=after, limit=limit + 1
        )
        more = len(items) > limit
        del items[limit:]
    streams = page is None and more
    count = await engine.count_children(entry) if streams else len(items)
    body: dict[str, object] = {"path": entry.path, "type": "directory", "recursive": recursive}
    if recursive and max_depth != 0:
        body["max_depth"] = max_depth
    body["count"] = count
    headers = {
        "X-CallFS-Type": "directory",
        "X-CallFS-Count": str(count),
        "X-CallFS-Recursive": "true" if recursive else "false",
    }
    if streams:
        head = dumps(body)[:-1].encode() + b',"items":['
        return await send_listing(
            request, headers, head, listing_chunks(request, entry, items), b"]}"
        )
    body["items"] = [entry_json(item) for item in items]
    if page is not None and more:
        body["next"] = headers["X-CallFS-Next"] = encode_cursor(items[-1])
    return json_response(body, headers=headers)


def add_routes(app: web.Application) -> None:
    for pattern in (PREFIX, PREFIX + ANY_TAIL):
        app.router.add_get(pattern, list_directory, allow_head=False)
