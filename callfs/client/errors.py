"""The client's one error type: what the server said (``code``, ``message``, HTTP ``status``)."""

from __future__ import annotations

import json


class ClientError(Exception):
    """An answer other than success, or no answer at all.

    ``status`` is the HTTP status (0 when the server could not be reached: ``code`` is then
    ``NETWORK_ERROR``); ``code`` and ``message`` come from the server's JSON error body
    (docs/api.md, "Errors"). HEAD answers carry no body: their ``code`` is derived from the status.
    Branch on ``status`` and ``code``, never on ``message``."""

    def __init__(
        self, status: int, code: str, message: str, *, request_id: str | None = None
    ) -> None:
        super().__init__(f"{code}: {message}" + (f" (HTTP {status})" if status else ""))
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id

    def as_dict(self) -> dict[str, object]:
        return {
            "status": self.status,
            "code": self.code,
            "message": self.message,
            "request_id": self.request_id,
        }


class TransportError(ClientError):
    """The server could not be reached, or the connection broke mid-request (``status`` 0)."""

    def __init__(self, message: str) -> None:
        super().__init__(0, "NETWORK_ERROR", message)


#: The code a body-less answer (HEAD) stands for.
_STATUS_CODES = {
    400: ("BAD_REQUEST", "bad request"),
    401: ("AUTHENTICATION_FAILED", "authentication failed"),
    403: ("PERMISSION_DENIED", "permission denied"),
    404: ("FILE_NOT_FOUND", "file not found"),
    405: ("METHOD_NOT_ALLOWED", "method not allowed"),
    409: ("CONFLICT", "conflict"),
    410: ("GONE", "gone"),
    412: ("PRECONDITION_FAILED", "precondition failed"),
    413: ("PAYLOAD_TOO_LARGE", "payload too large"),
    416: ("RANGE_NOT_SATISFIABLE", "range not satisfiable"),
    429: ("RATE_LIMIT_EXCEEDED", "rate limit exceeded"),
    500: ("INTERNAL_ERROR", "an internal error occurred"),
    502: ("PEER_UNAVAILABLE", "peer unavailable"),
    503: ("UNAVAILABLE", "service unavailable"),
    507: ("INSUFFICIENT_STORAGE", "insufficient storage"),
}


def error_from_response(status: int, body: bytes, request_id: str | None = None) -> ClientError:
    """The ``ClientError`` of an error answer: its JSON ``code``/``message`` when there is one
    (also the cross-node ``{"error": ...}`` shape), else one derived from the status."""
    code, message = _STATUS_CODES.get(status, (f"HTTP_{status}", f"HTTP {status}"))
    try:
        doc = json.loads(body) if body else None
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        code = str(doc.get("code") or code)
        message = str(doc.get("message") or doc.get("error") or message)
    elif body:
        message = body[:200].decode("utf-8", errors="replace").strip() or message
    return ClientError(status, code, message, request_id=request_id)


def bearer(api_key: str) -> str:
    """The ``Authorization`` value for ``api_key``: surrounding whitespace dropped (a key file
    written on Windows ends in CR). A control character inside cannot go in a header: the HTTP
    library's own error quoted the whole header, key included, in a traceback (found by a
    security audit), so this error names no part of the key."""
    key = api_key.strip()
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in key):
        raise ClientError(0, "BAD_API_KEY", "the API key contains a control character")
    return f"Bearer {key}"
