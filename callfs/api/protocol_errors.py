"""Requests aiohttp's HTTP parser refuses get the §8 envelope too (API.md §3, §8).

A request line or header line over the limit, a NUL or other forbidden byte in a header, a bad
method or version, or a conflicting ``Content-Length``/``Transfer-Encoding`` never reaches the
application: aiohttp answers it itself (``web_protocol.RequestHandler.handle_error``) with a
``text/plain`` body that may quote the request bytes, and without the security headers or a
request id. The one per-application hook aiohttp offers there is the request factory
(``Application._make_request``, which takes the request class as ``_cls``); such a request is
made from aiohttp's ``ERROR`` placeholder message, and its answer passes through the request's
``_prepare_hook`` just before its headers go out. This module is the only one that touches those
aiohttp internals.

A body that breaks the protocol (bad chunked encoding) is reported to the handler reading it; the
pipeline answers that (``middleware._handle``).
"""

from __future__ import annotations

import asyncio

from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import ERROR, RequestHandler

from callfs.api.errors import error_body, status_and_code
from callfs.api.middleware import new_request_id, set_security_headers
from callfs.api.state import STATE, ApiState, tls_of
from callfs.errors import BadRequest, InternalError

_STATE = web.RequestKey("callfs_refused_state", ApiState)


class _RefusedRequest(web.Request):
    """A request aiohttp could not parse (made from its ``ERROR`` placeholder; it has no route)."""

    async def _prepare_hook(self, response: web.StreamResponse) -> None:
        """Turn aiohttp's own answer into the JSON envelope. Its status stays (400 for anything
        the parser refuses; the status line is already prepared)."""
        if isinstance(response, web.Response):
            refusal = BadRequest("malformed request") if response.status < 500 else InternalError()
            _, code = status_and_code(refusal)
            body = error_body(response.status, code, refusal.message)
            response.body = body
            response.headers[hdrs.CONTENT_TYPE] = "application/json"
            response.headers[hdrs.CONTENT_LENGTH] = str(len(body))
        tls = tls_of(self[_STATE], self)
        set_security_headers(response, tls)
        response.headers["X-Request-ID"] = new_request_id()
        response.force_close()


def install(app: web.Application) -> None:
    """Make ``app``'s requests with ``_RefusedRequest`` when aiohttp could not parse them."""
    make_request = app._make_request

    def factory(
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
        _cls: type[web.Request] = web.Request,
    ) -> web.Request:
        if message is not ERROR:
            return make_request(message, payload, protocol, writer, task, _cls=_cls)
        request = make_request(message, payload, protocol, writer, task, _cls=_RefusedRequest)
        request[_STATE] = app[STATE]  # no route, so ``request.app`` cannot give it
        return request

    # Set through the instance dict: in aiohttp's debug mode, plain assignment warns.
    vars(app)["_make_request"] = factory
