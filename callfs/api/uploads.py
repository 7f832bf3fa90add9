"""``/v1/uploads/``: resumable uploads, tus 1.0.0 (core, creation, creation-with-upload,
termination, checksum, expiration). ``docs/uploads.md``; the logic is ``core/uploads.py``.

An upload lives on the node that created it (its ID names that node). Another node authenticates
the caller, then relays HEAD/PATCH/DELETE to it with the internal secret and the caller's user ID
in ``X-CallFS-Upload-User``, which the owner node honours only from the internal identity."""

from __future__ import annotations

import contextlib
import email.utils
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from callfs.api.errors import render_error
from callfs.api.files import body_chunks, check_declared_size, defer_continue, send_continue
from callfs.api.proxy import forward
from callfs.api.state import api_state, identity
from callfs.core.uploads import (
    CHECKSUM_ALGORITHMS,
    Checksum,
    Upload,
    UploadService,
    node_of,
    parse_checksum,
)
from callfs.errors import (
    BadRequest,
    CallFSError,
    PayloadTooLarge,
    TusVersionMismatch,
    UnsupportedMediaType,
    UploadNotFound,
)
from callfs.model import INTERNAL_PROXY_USER, Identity

log = logging.getLogger(__name__)

UPLOADS_PREFIX = "/v1/uploads"
UPLOADS = web.AppKey("callfs_uploads", UploadService)
TUS_VERSION = "1.0.0"
TUS_EXTENSIONS = "creation,creation-with-upload,termination,checksum,expiration"
OFFSET_CONTENT_TYPE = "application/offset+octet-stream"
#: The caller's user ID on a relayed request (trusted only with the internal secret).
ACTING_USER = "X-CallFS-Upload-User"
_TUS_REQUEST_HEADERS = (
    "Tus-Resumable",
    "Upload-Offset",
    "Upload-Length",
    "Upload-Checksum",
    "Upload-Metadata",
    "X-HTTP-Method-Override",  # a relayed POST is that method on the holder (``overridden``)
)
_TUS_RESPONSE_HEADERS = (
    "Tus-Resumable",
    "Tus-Version",
    "Upload-Offset",
    "Upload-Length",
    "Upload-Expires",
    "Upload-Metadata",
    "Cache-Control",
    "Location",
    "Allow",  # the holder's 405 (an override it does not know)
)

TusHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _service(request: web.Request) -> UploadService:
    return request.app[UPLOADS]


def _caller(request: web.Request) -> Identity:
    """The authenticated caller; on a request relayed by another node, the user it names."""
    who = identity(request)
    acting = request.headers.get(ACTING_USER)
    if acting and who.user_id == INTERNAL_PROXY_USER:
        return Identity(acting)
    return who


def _expires(upload: Upload) -> str:
    return email.utils.formatdate(upload.expires, usegmt=True)


def _state_headers(upload: Upload) -> dict[str, str]:
    headers = {"Upload-Offset": str(upload.offset), "Cache-Control": "no-store"}
    if not upload.committed:
        headers["Upload-Expires"] = _expires(upload)
    return headers


def _int_header(request: web.Request, name: str) -> int:
    raw = request.headers.get(name)
    # ASCII digits only: str.isdigit() takes "²" (then int() raised: a 500) and "٥"
    if raw is None or not raw.isascii() or not raw.isdigit() or len(raw) > 19:
        raise BadRequest(f"missing or invalid {name}")
    return int(raw)


def _checksum(request: web.Request) -> Checksum | None:
    raw = request.headers.get("Upload-Checksum")
    return None if raw is None else parse_checksum(raw)


def _tus(handler: TusHandler) -> TusHandler:
    """Protocol framing: ``Tus-Resumable`` checked (412); an upload living on another node is
    relayed there. (``tus_headers`` puts the header on every answer.)"""

    async def framed(request: web.Request) -> web.StreamResponse:
        try:
            if request.method != "OPTIONS" and request.headers.get("Tus-Resumable") != TUS_VERSION:
                raise TusVersionMismatch()
            upload_id = request.match_info.get("upload_id")
            service = _service(request)
            if (
                upload_id is not None
                and request.method != "OPTIONS"
                and not service.is_local(upload_id)
            ):
                return await _relay(request, upload_id)
            resp: web.StreamResponse = await handler(request)
        except CallFSError as exc:
            resp = render_error(exc)
            if isinstance(exc, TusVersionMismatch):
                resp.headers["Tus-Version"] = TUS_VERSION
        return resp

    return framed


def _is_tus(path: str) -> bool:
    return path == UPLOADS_PREFIX or path.startswith(UPLOADS_PREFIX + "/")


async def tus_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer under ``/v1/uploads`` carries ``Tus-Resumable``: the router's 404 and 405
    and the pipeline's 401 too (tus core: "MUST be included in every ... response"). A HEAD
    answer is never cached, an error included (tus core: HEAD "MUST" send ``no-store``)."""
    if not _is_tus(request.rel_url.path_safe):  # what the router matched (percent-decoded)
        return
    headers = response.headers
    headers.setdefault("Tus-Resumable", TUS_VERSION)
    if request.method == "HEAD":
        headers["Cache-Control"] = "no-store"


async def _relay(request: web.Request, upload_id: str) -> web.StreamResponse:
    node, _ = node_of(upload_id)
    if api_state(request).peers.endpoint(node) is None:
        raise UploadNotFound()  # no such node: no such upload (502 is for a node down)
    await send_continue(request)  # the owner node reads the body through this one
    return await forward(
        api_state(request).peers,
        request,
        node,
        extra_request=_TUS_REQUEST_HEADERS,
        extra_response=_TUS_RESPONSE_HEADERS,
        set_headers={ACTING_USER: _caller(request).user_id},
    )


# ---- handlers --------------------------------------------------------------------------------
async def options(request: web.Request) -> web.StreamResponse:
    return web.Response(
        status=204,
        headers={
            "Tus-Resumable": TUS_VERSION,
            "Tus-Version": TUS_VERSION,
            "Tus-Extension": TUS_EXTENSIONS,
            "Tus-Max-Size": str(_service(request).max_size),
            "Tus-Checksum-Algorithm": ",".join(CHECKSUM_ALGORITHMS),
        },
    )


async def create(request: web.Request) -> web.StreamResponse:
    """POST (creation): ``Upload-Length`` and ``Upload-Metadata`` (``path`` = destination); with
    an ``application/offset+octet-stream`` body, its bytes are the first PATCH."""
    service = _service(request)
    if "Upload-Defer-Length" in request.headers:
        raise BadRequest("Upload-Defer-Length is not supported")
    length = _int_header(request, "Upload-Length")
    with_body = request.content_type == OFFSET_CONTENT_TYPE
    if with_body:
        check_declared_size(request)
    checksum = _checksum(request) if with_body else None
    if with_body and (request.content_length or 0) > length:
        raise PayloadTooLarge("the body is longer than Upload-Length")
    who = _caller(request)
    upload = await service.create(who, length, request.headers.get("Upload-Metadata", ""))
    location = f"{UPLOADS_PREFIX}/{upload.id}"
    if with_body and not upload.complete:
        try:
            upload = await service.append(
                who, upload.id, 0, body_chunks(request, service.max_size), checksum
            )
        except CallFSError:
            # no Location goes out with the error: an upload left behind could be neither
            # resumed nor deleted by the client (it held its space until the expiry)
            with contextlib.suppress(CallFSError):
                await service.terminate(who, upload.id)
            raise
    headers = {"Location": location, **_state_headers(upload)}
    del headers["Cache-Control"]
    return web.Response(status=201, headers=headers)


async def head(request: web.Request) -> web.StreamResponse:
    upload = await _service(request).get(_caller(request), request.match_info["upload_id"])
    headers = {**_state_headers(upload), "Upload-Length": str(upload.length)}
    if upload.metadata:
        headers["Upload-Metadata"] = upload.metadata
    return web.Response(status=200, headers=headers)


async def patch(request: web.Request) -> web.StreamResponse:
    if request.content_type != OFFSET_CONTENT_TYPE:
        raise UnsupportedMediaType()
    offset = _int_header(request, "Upload-Offset")
    checksum = _checksum(request)
    check_declared_size(request)
    service = _service(request)
    upload = await service.append(
        _caller(request),
        request.match_info["upload_id"],
        offset,
        body_chunks(request, service.max_size),
        checksum,
    )
    return web.Response(status=204, headers=_state_headers(upload))


async def terminate(request: web.Request) -> web.StreamResponse:
    await _service(request).terminate(_caller(request), request.match_info["upload_id"])
    return web.Response(status=204)


_OVERRIDES: dict[str, TusHandler] = {"PATCH": patch, "HEAD": head, "DELETE": terminate}


async def overridden(request: web.Request) -> web.StreamResponse:
    """POST with ``X-HTTP-Method-Override`` (tus core: the header names the method, for clients
    that can only send GET and POST)."""
    handler = _OVERRIDES.get(request.headers.get("X-HTTP-Method-Override", "").strip().upper())
    if handler is None:
        raise web.HTTPMethodNotAllowed("POST", ["DELETE", "HEAD", "OPTIONS", "PATCH"])
    return await handler(request)


def add_routes(app: web.Application, service: UploadService) -> None:
    app[UPLOADS] = service
    app.on_response_prepare.append(tus_headers)
    for endpoint in (UPLOADS_PREFIX, UPLOADS_PREFIX + "/"):  # docs name it with the slash
        collection = app.router.add_resource(endpoint)
        collection.add_route("OPTIONS", _tus(options))
        collection.add_route("POST", _tus(create), expect_handler=defer_continue)
    item = app.router.add_resource(UPLOADS_PREFIX + "/{upload_id}")
    item.add_route("OPTIONS", _tus(options))
    item.add_route("HEAD", _tus(head))
    item.add_route("PATCH", _tus(patch), expect_handler=defer_continue)
    item.add_route("DELETE", _tus(terminate))
    item.add_route("POST", _tus(overridden), expect_handler=defer_continue)
