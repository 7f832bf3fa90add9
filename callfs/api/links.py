"""``POST /v1/links/generate`` and ``GET /download/{token}`` (API.md §9.12, §9.13)."""

from __future__ import annotations

import unicodedata
import urllib.parse
from typing import Any

from aiohttp import web

from callfs.api.errors import json_response
from callfs.api.files import defer_continue, read_json_object, send_stream
from callfs.api.state import api_state, client_ip, identity
from callfs.errors import BadRequest, NotFound, RateLimited
from callfs.links.service import MAX_EXPIRY, MIN_EXPIRY
from callfs.model import INTERNAL_PROXY_USER, Identity
from callfs.paths import parse_body_path

MAX_LINK_BODY = 4096
_SAFE = "-._~"  # with A-Z a-z 0-9: the only characters left unescaped in the file name


def link_base(external_url: str) -> str:
    base = external_url.rstrip("/")
    if base.startswith(("http://", "https://")):
        return base
    return "https://" + base


async def generate(request: web.Request) -> web.StreamResponse:
    state = api_state(request)
    if not state.link_limiter.allow(client_ip(request)):
        raise RateLimited()
    body = await read_json_object(request, MAX_LINK_BODY, "invalid request body")
    raw_path: Any = body.get("path", "")
    expiry: Any = body.get("expiry_seconds", 0)
    if not isinstance(raw_path, str) or isinstance(expiry, bool) or not isinstance(expiry, int):
        raise BadRequest("invalid request body")
    if not raw_path:
        raise BadRequest("path is required")
    path = parse_body_path(raw_path)
    entry = await state.engine.stat(identity(request), path)
    if not MIN_EXPIRY <= expiry <= MAX_EXPIRY:
        raise BadRequest(f"expiry_seconds must be between {MIN_EXPIRY} and {MAX_EXPIRY}")
    if entry.is_dir:
        raise BadRequest("links can only be generated for files")
    link, expires = await state.links.generate(entry.path, expiry)
    url = f"{link_base(state.external_url)}/download/{link.token}"
    return json_response(
        {"url": url, "token": link.token, "expires": expires}, status=201, newline=True
    )


def ascii_filename(name: str) -> str:
    """The plain ``filename=`` fallback (API.md §22): accents dropped (``é`` -> ``e``), then any
    other non-ASCII character, control character, ``"``, ``\\`` or ``%`` replaced by ``_``."""
    decomposed = unicodedata.normalize("NFKD", name)
    stripped = "".join(c for c in decomposed if not unicodedata.combining(c))
    return "".join(
        c if " " <= c <= "~" and c not in '"\\%' else "_"
        for c in unicodedata.normalize("NFC", stripped)
    )


def content_disposition(name: str) -> str:
    """``attachment; filename="<ASCII fallback>"; filename*=UTF-8''<name>`` (RFC 6266)."""
    return (
        f'attachment; filename="{ascii_filename(name)}"; '
        "filename*=UTF-8''" + urllib.parse.quote(name, safe=_SAFE)
    )


async def download(request: web.Request) -> web.StreamResponse:
    state = api_state(request)
    ip = client_ip(request)
    if not state.download_limiter.allow(ip):
        raise RateLimited()
    token = request.match_info["token"]
    path = await state.links.redeem(token, ip)
    reader = Identity(INTERNAL_PROXY_USER)  # the link itself is the authorization
    try:
        canonical = parse_body_path(path)
        entry = await state.engine.stat(reader, canonical)
    except BadRequest as exc:
        raise NotFound() from exc
    if entry.is_dir:
        raise NotFound()
    entry, stream = await state.engine.open_file(reader, entry)
    headers = {
        "Content-Disposition": content_disposition(entry.name),
    }
    return await send_stream(request, stream, 200, headers)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/links/generate", generate, expect_handler=defer_continue)
    app.router.add_get("/download/{token}", download, allow_head=False)
