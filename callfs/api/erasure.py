"""Erasure coding over HTTP (API.md §11, §9.11, §12.6): POST parameters, the manifest, the public
shard endpoint and the internal one other nodes store and fetch shards through."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from callfs.api.numbers import parse_int
from callfs.api.state import api_state, identity
from callfs.core.engine import ErasureRequest
from callfs.core.maintenance import ErasureMaintenance
from callfs.core.peer import url_path
from callfs.erasure.codec import LEGACY_BLOCK
from callfs.erasure.service import MAX_SHARDS
from callfs.erasure.shards import SHA256_HEADER, hashed, shard_key
from callfs.errors import BadRequest, InternalError, NotFound, PayloadTooLarge
from callfs.model import BackendType, Entry, ErasureLayout
from callfs.paths import after_prefix, parse_body_path, parse_request_path
from callfs.storage.base import StorageBackend, publish_or_discard

SHARDS_PREFIX = "/v1/shards/"
INTERNAL_PREFIX = "/v1/internal/shards/"
log = logging.getLogger(__name__)
#: A shard index as §9.11 parses it (an integer, ASCII digits, an optional sign).
_INDEX = re.compile(r"[+-]?[0-9]+")

ERASURE_BACKEND = web.AppKey("callfs_shard_backend", StorageBackend)
MAINTENANCE = web.AppKey("callfs_erasure_maintenance", ErasureMaintenance)


# ---- POST parameters (§11.1) -----------------------------------------------------------------
def _param(request: web.Request, header: str, query: str) -> str | None:
    if header in request.headers:
        return request.headers[header]
    return request.rel_url.query.get(query)


def _count(raw: str | None, what: str) -> int | None:
    """A shard count as v1 read it (``numbers.parse_int``: ``+2`` is 2, `` 2`` is not a number;
    a number of thousands of digits was a 500 from ``int()``)."""
    if raw is None:
        return None
    value = parse_int(raw)
    if value is None or value < 1:
        raise BadRequest(f"{what} must be an integer >= 1")
    return value


def erasure_request(request: web.Request) -> ErasureRequest | None:
    """The POST's erasure parameters, or None when it does not ask for erasure coding. Every
    400 of §11.1 is decided here, before authorization and the existence check (§8's order):
    the total with the node's defaults filled in, and each named instance."""
    if _param(request, "X-CallFS-Erasure", "erasure") != "true":
        return None
    data = _count(_param(request, "X-CallFS-Erasure-Data-Shards", "data_shards"), "data shards")
    parity = _count(
        _param(request, "X-CallFS-Erasure-Parity-Shards", "parity_shards"), "parity shards"
    )
    engine = api_state(request).engine
    defaults = engine.settings
    total = (data or defaults.erasure_data_shards) + (parity or defaults.erasure_parity_shards)
    if total > MAX_SHARDS:
        raise BadRequest(f"data + parity shards must be <= {MAX_SHARDS}")
    raw = _param(request, "X-CallFS-Erasure-Instances", "instances")
    # an empty list names no node: the default placement, as when absent (§11.1 refuses only
    # unknown IDs)
    instances = tuple(i.strip() for i in (raw or "").split(",") if i.strip()) or None
    engine.check_instances(instances or ())
    return ErasureRequest(data, parity, instances)


# ---- manifest (§11.5) ---------------------------------------------------------------------------
def _endpoint(request: web.Request, node: str) -> str:
    state = api_state(request)
    if node == state.instance_id:
        return state.external_url.rstrip("/")
    found = state.peers.endpoint(node)
    if found is None:
        raise InternalError(f"no endpoint known for node {node}")
    return found.rstrip("/")


def manifest_response(request: web.Request, entry: Entry, layout: ErasureLayout) -> web.Response:
    encoded = url_path(entry.path).lstrip("/")
    body: dict[str, Any] = {
        "path": entry.path,
        "original_size": layout.original_size,
        "erasure_profile": {
            "data_shards": layout.data_shards,
            "parity_shards": layout.parity_shards,
            "shard_size": layout.shard_size,
        },
        "shards": [
            {
                "index": s.index,
                "endpoint": f"{_endpoint(request, s.instance_id)}/v1/shards/{encoded}/{s.index}",
                "size": s.size,
                "checksum": s.checksum,
            }
            for s in sorted(layout.shards, key=lambda s: s.index)
        ],
    }
    return web.Response(
        body=(json.dumps(body, separators=(",", ":"), ensure_ascii=False) + "\n").encode(),
        content_type="application/json",
    )


# ---- shard bytes of this node ------------------------------------------------------------------
async def _verified_stream(
    request: web.Request, backend: StorageBackend, key: str, size: int, checksum: str | None
) -> web.StreamResponse:
    """Send a local shard; with ``checksum``, verify the whole shard first (§9.11)."""
    if checksum is not None:
        digest = hashlib.sha256()
        stream = await backend.open_read(key, 0, size)
        try:
            async for chunk in stream:
                digest.update(chunk)
        finally:
            await stream.aclose()
        if digest.hexdigest() != checksum:
            raise InternalError("shard checksum mismatch")
    return await _send(request, backend, key, 0, size, 200)


async def _send(
    request: web.Request,
    backend: StorageBackend,
    key: str,
    offset: int,
    length: int,
    status: int,
) -> web.StreamResponse:
    stream = await backend.open_read(key, offset, length)
    try:
        resp = web.StreamResponse(
            status=status,
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(length)},
        )
        await resp.prepare(request)
        async for chunk in stream:
            await resp.write(chunk)
        await resp.write_eof()
        return resp
    finally:
        await stream.aclose()


def _index(segment: str) -> int | None:
    """A shard index segment (§9.11, §12.6): an integer, decoded once as every segment (§21):
    "%30" is 0, "+1" is 1; "-1" and an integer too long to be an index (int() refuses over 4,300
    digits) are out of range (-1). None if it is no integer."""
    try:
        decoded = urllib.parse.unquote(segment, errors="strict")
    except UnicodeDecodeError:
        return None
    if not _INDEX.fullmatch(decoded):
        return None
    return int(decoded) if len(decoded.lstrip("+-")) <= 9 else -1


async def public_shard(request: web.Request) -> web.StreamResponse:
    """``GET /v1/shards/<path>/<index>`` (§9.11)."""
    head, sep, last = after_prefix(request.rel_url.raw_path, SHARDS_PREFIX).rpartition("/")
    index = _index(last) if sep else None
    if index is None:
        raise BadRequest("the last path segment must be the shard index")
    path = parse_request_path(head)
    state = api_state(request)
    entry = await state.engine.stat(identity(request), path)
    if entry.is_dir or entry.backend_type is not BackendType.ERASURE:
        raise NotFound("file is not erasure coded")
    layout = await state.engine.erasure_layout(entry)
    if not 0 <= index < len(layout.shards):
        raise NotFound(f"shard {last} does not exist" if index >= 0 else "no such shard")
    info = layout.shards[index]
    if info.instance_id != state.instance_id:
        raise NotFound(f"shard {index} is not stored on this node")
    backend = request.app[ERASURE_BACKEND]
    key = shard_key(layout.upload_id, index)
    if await backend.stat(key) is None:
        raise NotFound(f"shard {index} is missing on this node")
    return await _verified_stream(request, backend, key, info.size, info.checksum)


# ---- internal shard endpoint (§12.6): plain-text errors ----------------------------------------
def _text(status: int, message: str) -> web.Response:
    return web.Response(status=status, text=message + "\n", content_type="text/plain")


def _shard_address(raw: str) -> tuple[str, int] | web.Response:
    """``(key, index)`` of ``/v1/internal/shards/{key}/{index}`` (§12.6), from the raw path:
    ``{key}`` is everything before the last ``/``, validated like a path and already clean (no
    empty, ``.`` or ``..`` segment: it names a directory under ``.erasure/`` as it is written);
    ``{index}`` an integer (decoded once, as a path segment). Else the plain-text 400."""
    head, sep, last = raw.rpartition("/")
    index = _index(last) if sep else None
    if index is None:
        return _text(400, "invalid shard index")
    try:
        path = parse_request_path(head)
        written = "/".join(urllib.parse.unquote(p, errors="strict") for p in head.split("/"))
    except (BadRequest, UnicodeDecodeError):
        return _text(400, "invalid shard key")
    if path.is_root or path.dir_form or path.path[1:] != written:
        return _text(400, "invalid shard key")
    return path.path[1:], index


def shard_cap(max_upload_size: int) -> int:
    """The largest shard of a file within ``server.max_upload_size`` (§12.6's 413): a 1+m
    profile's shard is the whole file plus a tag per block (32 bytes per 256 KiB at worst)."""
    return max_upload_size + (max_upload_size // LEGACY_BLOCK + 1) * 32


async def _capped(chunks: AsyncIterator[bytes], cap: int) -> AsyncIterator[bytes]:
    total = 0
    async for chunk in chunks:
        total += len(chunk)
        if total > cap:
            raise PayloadTooLarge()
        yield chunk


async def internal_shard(request: web.Request) -> web.StreamResponse:
    state = api_state(request)
    if not state.auth.is_internal(request.headers.get("Authorization")):
        return _text(401, "unauthorized")
    parsed = _shard_address(after_prefix(request.rel_url.raw_path, INTERNAL_PREFIX))
    if isinstance(parsed, web.Response):
        return parsed
    shard, index = parsed
    if index < 0:  # an integer, but no shard has it
        if request.method == "PUT":
            return _text(400, "invalid shard index")
        return (
            web.Response(status=204)
            if request.method == "DELETE"
            else _text(404, "shard not found")
        )
    backend = request.app[ERASURE_BACKEND]
    key = shard_key(shard, index)
    if request.method == "PUT":
        cap = shard_cap(state.max_upload_size)
        if (request.content_length or 0) > cap:
            return _text(413, "shard too large")
        digest = hashlib.sha256()
        try:
            body = hashed(_capped(request.content.iter_any(), cap), digest)  # no joins
            await publish_or_discard(await backend.stage(key, body))
        except PayloadTooLarge:
            return _text(413, "shard too large")
        except (BadRequest, ConnectionError):
            return _text(400, "body read error")
        except Exception:
            log.warning("storing a shard for another node failed", exc_info=True)
            return _text(500, "store error")
        return web.Response(status=201, headers={SHA256_HEADER: digest.hexdigest()})
    if request.method == "DELETE":
        with contextlib.suppress(NotFound):
            await backend.delete(key)
        return web.Response(status=204)
    # GET, with an optional single byte range (our addition: readers fetch only what they need)
    found = await backend.stat(key)
    if found is None:
        return _text(404, "shard not found")
    offset, length = 0, found.size
    span = request.headers.get("Range", "")
    if span.startswith("bytes=") and "-" in span:
        first, _, end = span[6:].partition("-")
        start = parse_int(first) if first[:1] not in "+-" else None
        if start is not None:  # ("²".isdigit() is true, and int() of it raised: a 500)
            offset = min(start, found.size)
            last = parse_int(end) if end[:1] not in "+-" else None
            stop = last + 1 if last is not None else found.size
            length = max(min(stop, found.size) - offset, 0)
    status = 200 if (offset, length) == (0, found.size) else 206
    return await _send(request, backend, key, offset, length, status)


async def repair(request: web.Request) -> web.StreamResponse:
    """``POST /v1/internal/erasure/repair`` ``{"path": optional}`` (``callfs erasure repair``):
    check and rebuild now; the report as JSON."""
    state = api_state(request)
    if not state.auth.is_internal(request.headers.get("Authorization")):
        return web.json_response({"error": "unauthorized"}, status=401)
    try:
        body = json.loads(await request.content.read(1 << 16) or b"{}")
        raw = body.get("path") if isinstance(body, dict) else None
        path = None if raw in (None, "", "/") else parse_body_path(str(raw)).path
    except (ValueError, BadRequest) as exc:
        return web.json_response({"error": f"invalid request: {exc}"}, status=400)
    try:
        report = await request.app[MAINTENANCE].repair(path)
    except NotFound:
        return web.json_response({"error": "file not found"}, status=404)
    except BadRequest as exc:
        return web.json_response({"error": exc.message}, status=400)
    return web.json_response(report.as_dict())


def add_routes(
    app: web.Application, shard_backend: StorageBackend, maintenance: ErasureMaintenance | None
) -> None:
    app[ERASURE_BACKEND] = shard_backend
    if maintenance is not None:
        app[MAINTENANCE] = maintenance
        app.router.add_post("/v1/internal/erasure/repair", repair)
    app.router.add_get(SHARDS_PREFIX + r"{tail:[\s\S]+}", public_shard, allow_head=False)
    for method in ("GET", "PUT", "DELETE"):
        app.router.add_route(method, INTERNAL_PREFIX + r"{tail:[\s\S]+}", internal_shard)
