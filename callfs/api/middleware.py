"""The public request pipeline (API.md §3): request id, security headers, authentication, one
translation of errors to JSON, and a 500 for anything unexpected. Internal endpoints skip it."""

from __future__ import annotations

import asyncio
import logging
import random
import time

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler

from callfs.api.errors import error_response, render_error
from callfs.api.state import (
    CONTINUE_PENDING,
    IDENTITY,
    REQUEST_ID,
    api_state,
    bridge_of,
    client_gone,
    client_ip,
    tls_of,
)
from callfs.errors import BadRequest, CallFSError
from callfs.log import request_id_var

log = logging.getLogger(__name__)
access_log = logging.getLogger("callfs.access")
#: Request ids need to be unique, not secret: a PRNG seeded from the OS avoids a getrandom syscall
#: per request.
_ids = random.Random()  # noqa: S311

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "object-src 'none'; base-uri 'self'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "strict-origin-when-cross-origin",
    "Permissions-Policy": (
        "geolocation=(), microphone=(), camera=(), payment=(), usb=(), magnetometer=(), "
        "gyroscope=(), accelerometer=()"
    ),
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
}
HSTS = "max-age=31536000; includeSubDomains; preload"

INTERNAL_PREFIX = "/v1/internal/"


def _refused_method(match: web.UrlMappingMatchInfo | None) -> web.HTTPMethodNotAllowed | None:
    """The router's 405 for a known route taken with another method, else None."""
    refused = getattr(match, "http_exception", None)
    return refused if isinstance(refused, web.HTTPMethodNotAllowed) else None


def is_internal(request: web.Request) -> bool:
    """A request to an internal endpoint (§12.6), a wrong method included: it skips the public
    pipeline. A path under the prefix that names no endpoint is an unknown route, which the
    pipeline answers (the JSON 404, with the security headers)."""
    if not request.rel_url.path_safe.startswith(INTERNAL_PREFIX):
        return False
    match = request.match_info
    if match is None:  # answered before routing (a request the parser refused)
        return False
    if match.route.resource is not None:
        return True
    return _refused_method(match) is not None


def needs_bearer(path: str) -> bool:
    """``/metrics`` and all of ``/v1/`` except ``/v1/internal/`` — decided before routing, on the
    path as the router reads it (``URL.path_safe``: escapes decoded but ``%2F`` and ``%25``), so
    that ``/%6Detrics`` is ``/metrics`` for both (it was answered without credentials)."""
    if path == "/metrics":
        return True
    return (path == "/v1" or path.startswith("/v1/")) and not path.startswith(INTERNAL_PREFIX)


def new_request_id() -> str:
    """16 lowercase hex characters, always fresh (§3 step 1)."""
    return f"{_ids.getrandbits(64):016x}"


def unavailable_early(message: str) -> web.Response:
    """A 503 answered before the pipeline (a draining node, a worker's relay): with
    ``Retry-After`` (§8) and an ``X-Request-ID`` (§3) like every other answer."""
    resp = error_response(503, "UNAVAILABLE", message)
    resp.headers["Retry-After"] = "1"
    resp.headers["X-Request-ID"] = new_request_id()
    return resp


def set_security_headers(response: web.StreamResponse, tls: bool) -> None:
    response.headers.update(SECURITY_HEADERS)
    if tls:
        response.headers["Strict-Transport-Security"] = HSTS


async def on_response_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """Headers every public response carries, streamed ones included (set before headers go out)."""
    if is_internal(request):
        return
    state = api_state(request)
    set_security_headers(response, tls_of(state, request))
    headers = response.headers
    alt_svc = state.alt_svc
    if alt_svc and bridge_of(state, request) != "h3":
        headers["Alt-Svc"] = alt_svc
    rid = request.get(REQUEST_ID)
    if isinstance(rid, str):
        headers["X-Request-ID"] = rid
    if request.get(CONTINUE_PENDING):
        # Answered without asking for the body (``files.defer_continue``): the client may still
        # send it or not, so the connection cannot carry another request.
        response.force_close()
        headers["Connection"] = "close"  # aiohttp prepared the headers while still keep-alive


def _from_http_exception(exc: web.HTTPException) -> web.Response:
    if exc.status == 404:
        return error_response(404, "NOT_FOUND", "not found")
    if exc.status == 405:
        resp = error_response(405, "METHOD_NOT_ALLOWED", "method not allowed")
        allow = exc.headers.get("Allow")
        if allow:
            resp.headers["Allow"] = allow
        return resp
    if exc.status == 413:
        return error_response(413, "PAYLOAD_TOO_LARGE", "payload too large")
    if exc.status < 500:
        return error_response(exc.status, "BAD_REQUEST", exc.reason or "bad request")
    return error_response(500, "INTERNAL_ERROR", "")


#: aiohttp resource patterns -> the route templates used as the ``path`` metric label (§16).
_TEMPLATES = {
    "/health": "/health",
    "/metrics": "/metrics",
    "/v1/files": "/v1/files/*",
    "/v1/files/{tail}": "/v1/files/*",
    "/v1/files/ws/{tail}": "/v1/files/ws/*",
    "/v1/directories": "/v1/directories/*",
    "/v1/directories/{tail}": "/v1/directories/*",
    "/v1/shards/{tail}": "/v1/shards/*",
    "/v1/links/generate": "/v1/links/generate",
    "/download/{token}": "/download/{token}",
    "/openapi.json": "/openapi.json",
    "/v1/uploads": "/v1/uploads/*",
    "/v1/uploads/{upload_id}": "/v1/uploads/*",
    "/v1/status": "/v1/status",
    "/ui": "/ui/*",
    "/ui/": "/ui/*",
    "/ui/{name}": "/ui/*",
}


#: The route a 405 was answered on (aiohttp's answer names no resource).
_REFUSED_ROUTE = web.RequestKey("callfs_refused_route", str)


def route_template(request: web.Request) -> str:
    resource = request.match_info.route.resource
    if resource is None:
        refused: str = request.get(_REFUSED_ROUTE, "unmatched")
        return refused
    return _TEMPLATES.get(resource.canonical, "unmatched")


async def _note_refused_route(request: web.Request) -> None:
    """A method a known route does not take (405) is counted under that route's template
    (§16: ``path`` is the route template; ``unmatched`` is for no route). Only on a 405."""
    for resource in request.app.router.resources():
        _, allowed = await resource.resolve(request)
        if allowed:
            request[_REFUSED_ROUTE] = _TEMPLATES.get(resource.canonical, "unmatched")
            return


#: The status recorded for a request whose client went away before the answer (nginx's code;
#: nothing is sent, the connection is gone).
CLIENT_CLOSED_REQUEST = 499


@web.middleware
async def in_flight(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The first middleware: counts the requests in progress (also those a worker relays to
    its primary) for ``Node._drain``. While the node drains, a new request (one more on a
    kept-alive connection) gets 503 and every answer closes its connection, so the count
    reaches zero instead of taking requests the node would cancel at the end."""
    state = api_state(request)
    if state.draining and bridge_of(state, request) != "worker":  # workers finish theirs
        resp = unavailable_early("the node is shutting down")
        resp.force_close()
        return resp
    state.active += 1
    try:
        response = await handler(request)
        if state.draining:
            response.force_close()
        return response
    finally:
        state.active -= 1


@web.middleware
async def pipeline(request: web.Request, handler: Handler) -> web.StreamResponse:
    if is_internal(request):
        http_error = _refused_method(request.match_info)
        if http_error is not None:  # §12.6: 405, empty body
            allow = ",".join(sorted(http_error.allowed_methods))
            return web.Response(status=405, headers={"Allow": allow})
        return await handler(request)
    rid = new_request_id()
    request[REQUEST_ID] = rid
    request_id_var.set(rid)
    started = time.perf_counter()
    status = 500
    # now: a client that hangs up takes its transport (and its address) with it
    remote = client_ip(request) if access_log.isEnabledFor(logging.INFO) else ""
    if _refused_method(request.match_info) is not None:
        await _note_refused_route(request)
    try:
        response = await _handle(request, handler)
        status = response.status
        return response
    except asyncio.CancelledError:
        if client_gone(request):  # the server cancels the handler of a client that left
            status = CLIENT_CLOSED_REQUEST
        raise
    finally:
        _observe(request, status, time.perf_counter() - started, rid, remote)


def _observe(request: web.Request, status: int, duration: float, rid: str, remote: str) -> None:
    """One metrics observation and one access-log line per public request (§16, §17)."""
    template = route_template(request)
    metrics = api_state(request).metrics
    method = request.method
    metrics.http_requests.labels(method, template, str(status)).inc()
    metrics.http_duration.labels(method, template).observe(duration)
    if status >= 500:
        metrics.errors.labels("http", str(status)).inc()
    if not access_log.isEnabledFor(logging.INFO):
        return  # the level hides the line: skip building its fields (headers)
    access_log.info(
        "HTTP request",
        extra={
            "method": request.method,
            "path": template,
            "status": status,
            "duration": round(duration, 6),
            "user_agent": request.headers.get("User-Agent", ""),
            "remote_addr": remote,
            "request_id": rid,
        },
    )


async def _handle(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        if needs_bearer(request.rel_url.path_safe):
            request[IDENTITY] = api_state(request).auth.identify(
                request.headers.get("Authorization")
            )
        return await handler(request)
    except CallFSError as exc:
        if type(exc).__name__ == "InternalError" or render_error(exc).status >= 500:
            log.warning("request failed: %s (%s)", type(exc).__name__, exc.message)
        return render_error(exc)
    except web.HTTPException as exc:
        return _from_http_exception(exc)
    except HttpProcessingError:
        # the body broke the protocol (bad chunked encoding, ...): the client's fault, not ours;
        # aiohttp's text of it quotes request bytes, so it is not passed on.
        resp = render_error(BadRequest("malformed request body"))
        resp.force_close()  # the rest of the stream cannot be parsed either
        return resp
    except ConnectionError:
        if client_gone(request):
            # the client hung up mid-request: not a server error (it inflated the 5xx rate and
            # logged a traceback per abort); nginx's 499 in the metrics and the access log
            return web.Response(status=CLIENT_CLOSED_REQUEST)
        log.exception("unhandled error")
        return error_response(500, "INTERNAL_ERROR", "")
    except Exception:
        log.exception("unhandled error")
        return error_response(500, "INTERNAL_ERROR", "")
