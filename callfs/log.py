"""Logging set-up (API.md §17): level, json|console on stderr, a request id in a contextvar, a
redaction filter so API keys, secrets and link tokens never appear in full in any record, and
the ``CALLFS_LOG_MODE`` redaction of paths, user IDs and sizes in operation logs
(``shown_path``, ``shown_user``, ``shown_size``: every record that names one goes through them)."""

from __future__ import annotations

import contextvars
import hashlib
import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterable
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "error": logging.ERROR,
}
#: Fields of ``extra=`` that formatters print (the access log uses them).
_EXTRA_FIELDS = (
    "method",
    "path",
    "status",
    "duration",
    "user_agent",
    "remote_addr",
    "request_id",
)
#: A link token: 24-char id (ending ==) + "." + 44-char signature.
_TOKEN = re.compile(r"([A-Za-z0-9_-]{22}==)\.[A-Za-z0-9_-]{43}=")


#: §17: how operation logs show paths, user IDs and sizes; any other value (or none) is the
#: default, ``production``.
LOG_MODES = ("production", "development", "debug")
_mode = "production"


def set_log_mode(value: str | None) -> None:
    global _mode
    _mode = value if value in LOG_MODES else "production"


def shown_path(path: str) -> str:
    """A namespace path as operation logs show it (§17)."""
    if _mode == "debug":
        return path
    if _mode == "development":
        return path if len(path) <= 20 else f"{path[:10]}...{path[-7:]}"
    return "hash:" + hashlib.sha256(path.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def shown_user(user_id: str) -> str:
    """A user ID as operation logs show it (§17)."""
    if _mode == "debug":
        return user_id
    if _mode == "development":
        return user_id if len(user_id) <= 8 else f"{user_id[:4]}****"
    return "user_hash:" + hashlib.sha256(user_id.encode("utf-8", "surrogatepass")).hexdigest()[:12]


def shown_size(size: int) -> str:
    """A size in bytes as operation logs show it (§17): to the nearest KiB in production."""
    if _mode == "production":
        return f"{(size + 512) // 1024} KiB"
    return f"{size} bytes"


class RedactionFilter(logging.Filter):
    """Replaces every configured secret with ``[REDACTED]`` and cuts link tokens to 8 characters,
    in the message, its arguments and the extra fields."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def set_secrets(self, secrets: Iterable[str]) -> None:
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "[REDACTED]")
        return _TOKEN.sub(lambda m: m.group(1)[:8] + "...", text)

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self.redact(record.getMessage())
        record.args = None
        for name in _EXTRA_FIELDS:
            value = record.__dict__.get(name)
            if isinstance(value, str):
                record.__dict__[name] = self.redact(value)
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = self.redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


class RefusedRequestFilter(logging.Filter):
    """For ``aiohttp.server``: a request its HTTP parser refused (an ``HttpProcessingError`` in
    the record) becomes one WARNING line naming the client address and the error class, with no
    traceback and none of the request's bytes. Any client can send such requests, so each must
    not cost an ERROR with a traceback; the client already got its 400. Other records pass as
    they are."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        remote = args[0] if len(args) == 1 and isinstance(args[0], str) else "?"
        record.msg = "refused a malformed HTTP request from %s (%s)"
        record.args = (remote, type(exc).__name__)
        record.exc_info = None
        record.exc_text = None
        if record.levelno > logging.WARNING:  # never raised: aiohttp's debug records stay debug
            record.levelno = logging.WARNING
            record.levelname = logging.getLevelName(logging.WARNING)
            # The logger let the ERROR through; the WARNING it now is must pass the level too.
            return logging.getLogger(record.name).isEnabledFor(logging.WARNING)
        return True


#: This process's index when it is a worker of its node (``server.workers``); None: the primary,
#: or the only process. Shown on every line so that operators can tell the processes apart.
_worker: int | None = None


def set_worker(index: int | None) -> None:
    global _worker
    _worker = index


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if _worker is not None:
            out["worker"] = _worker
        rid = record.__dict__.get("request_id") or request_id_var.get()
        if rid:
            out["request_id"] = rid
        for name in _EXTRA_FIELDS:
            if name != "request_id" and name in record.__dict__:
                out[name] = record.__dict__[name]
        if record.exc_text:
            out["error"] = record.exc_text
        return json.dumps(out, ensure_ascii=False, default=str)


class ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        parts = [f"{stamp} {record.levelname:<7} {record.name}: {record.getMessage()}"]
        rid = record.__dict__.get("request_id") or request_id_var.get()
        for name in _EXTRA_FIELDS:
            if name != "request_id" and name in record.__dict__:
                parts.append(f"{name}={record.__dict__[name]}")
        if rid:
            parts.append(f"request_id={rid}")
        if _worker is not None:
            parts.append(f"worker={_worker}")
        line = " ".join(parts)
        if record.exc_text:
            line += "\n" + record.exc_text
        return line


REDACTION = RedactionFilter()
REFUSED_REQUESTS = RefusedRequestFilter()


def configure_logging(level: str, fmt: str, secrets: Iterable[str] = ()) -> None:
    """Route every record to stderr through the redaction filter, and make ``aiohttp.server``'s
    records of refused requests one line each (idempotent). ``level`` is one of §17's names (in
    any case), else info; the path, user and size redaction follows ``CALLFS_LOG_MODE``."""
    REDACTION.set_secrets(secrets)
    set_log_mode(os.environ.get("CALLFS_LOG_MODE"))
    server_logger = logging.getLogger("aiohttp.server")
    if REFUSED_REQUESTS not in server_logger.filters:
        server_logger.addFilter(REFUSED_REQUESTS)
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(REDACTION)
    handler.setFormatter(JsonFormatter() if fmt == "json" else ConsoleFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(_LEVELS.get(level.lower(), logging.INFO))
