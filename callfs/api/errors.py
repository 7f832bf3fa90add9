"""The one place where CallFS errors become HTTP answers (API.md §8)."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from callfs import errors as e

#: error class -> (status, code). The first matching class in MRO order wins.
_TABLE: dict[type[e.CallFSError], tuple[int, str]] = {
    e.BadRequest: (400, "BAD_REQUEST"),
    e.AuthenticationFailed: (401, "AUTHENTICATION_FAILED"),
    e.PermissionDenied: (403, "PERMISSION_DENIED"),
    e.NotFound: (404, "FILE_NOT_FOUND"),
    e.LinkNotFound: (404, "LINK_NOT_FOUND"),
    e.AlreadyExists: (409, "FILE_ALREADY_EXISTS"),
    e.DirectoryNotEmpty: (409, "DIRECTORY_NOT_EMPTY"),
    e.LinkExpired: (410, "LINK_EXPIRED"),
    e.LinkAlreadyUsed: (410, "LINK_ALREADY_USED"),
    e.UploadNotFound: (404, "UPLOAD_NOT_FOUND"),
    e.UploadExpired: (410, "UPLOAD_EXPIRED"),
    e.UploadOffsetMismatch: (409, "UPLOAD_OFFSET_MISMATCH"),
    e.ChecksumMismatch: (460, "CHECKSUM_MISMATCH"),
    e.TusVersionMismatch: (412, "PRECONDITION_FAILED"),
    e.VersionMoved: (412, "PRECONDITION_FAILED"),
    e.UnsupportedMediaType: (415, "UNSUPPORTED_MEDIA_TYPE"),
    e.PayloadTooLarge: (413, "PAYLOAD_TOO_LARGE"),
    e.RangeNotSatisfiable: (416, "RANGE_NOT_SATISFIABLE"),
    e.RateLimited: (429, "RATE_LIMIT_EXCEEDED"),
    e.PeerUnavailable: (502, "PEER_UNAVAILABLE"),
    e.Unavailable: (503, "UNAVAILABLE"),
    e.InsufficientShards: (503, "INSUFFICIENT_SHARDS"),
    e.InsufficientStorage: (507, "INSUFFICIENT_STORAGE"),
    # A lost race that the engine did not resolve: the client may simply retry.
    e.VersionConflict: (503, "UNAVAILABLE"),
}

#: Messages that the contract fixes exactly.
_FIXED_MESSAGES = {
    401: "authentication failed",
    403: "permission denied",
    429: "Rate limit exceeded",
    500: "an internal error occurred",
}

INTERNAL_ERROR = (500, "INTERNAL_ERROR")


def dumps(value: Any) -> str:
    """Compact JSON with non-ASCII left as is (API.md §1)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def json_response(
    value: Any, status: int = 200, newline: bool = False, headers: dict[str, str] | None = None
) -> web.Response:
    body = dumps(value) + ("\n" if newline else "")
    resp = web.Response(status=status, body=body.encode(), headers=headers)
    resp.content_type = "application/json"
    return resp


def status_and_code(exc: e.CallFSError) -> tuple[int, str]:
    for cls in type(exc).__mro__:
        if cls in _TABLE:
            return _TABLE[cls]
    return INTERNAL_ERROR


def error_body(status: int, code: str, message: str) -> bytes:
    """The standard body (§8 shape 1)."""
    return dumps({"code": code, "message": _FIXED_MESSAGES.get(status, message)}).encode()


def error_response(status: int, code: str, message: str) -> web.Response:
    resp = web.Response(status=status, body=error_body(status, code, message))
    resp.content_type = "application/json"
    return resp


def render_error(exc: e.CallFSError) -> web.Response:
    status, code = status_and_code(exc)
    resp = error_response(status, code, exc.message)
    if isinstance(exc, e.Unavailable):
        resp.headers["Retry-After"] = str(exc.retry_after)
    elif isinstance(exc, e.VersionConflict):
        resp.headers["Retry-After"] = "1"
    elif isinstance(exc, e.RangeNotSatisfiable):
        resp.headers["Content-Range"] = f"bytes */{exc.size}"
    return resp
