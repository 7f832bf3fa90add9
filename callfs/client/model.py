"""Plain data and URL rules shared by the sync and async clients (no I/O here)."""

from __future__ import annotations

import base64
import json
import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

#: Streaming chunk for downloads and for bodies read from files.
CHUNK = 1 << 20
#: One listing page (the server accepts 1..10000).
PAGE_SIZE = 1000
#: Files at least this large go through tus when the server offers it.
RESUMABLE_THRESHOLD = 16 << 20
#: Bytes per tus PATCH (each one is made durable on the server before it is acknowledged).
TUS_CHUNK = 64 << 20
TUS_VERSION = "1.0.0"
OFFSET_CONTENT_TYPE = "application/offset+octet-stream"


@dataclass(frozen=True, slots=True)
class Entry:
    """A file or directory as the server describes it (docs/api.md, "Items")."""

    path: str
    type: str
    size: int
    mode: str = ""
    owner: str = ""
    mtime: str = ""

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def is_dir(self) -> bool:
        return self.type == "directory"

    @property
    def mtime_epoch(self) -> float | None:
        """``mtime`` as seconds since the epoch (whole seconds; None if absent)."""
        return parse_time(self.mtime)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self)}


@dataclass(frozen=True, slots=True)
class Link:
    """A single-use download link (``POST /v1/links/generate``)."""

    url: str
    token: str
    expires: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_time(text: str) -> float | None:
    if not text:
        return None
    import datetime as dt  # not at import time: `callfs --help` has no use for it

    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def entry_from_json(item: Mapping[str, Any]) -> Entry:
    return Entry(
        path=str(item.get("path", "")),
        type=str(item.get("type", "file")),
        size=int(item.get("size") or 0),
        mode=str(item.get("mode", "")),
        owner=str(item.get("owner", "")),
        mtime=str(item.get("mtime", "")),
    )


def entry_from_headers(path: str, headers: Mapping[str, str]) -> Entry:
    """The entry a HEAD answer describes (its ``X-CallFS-*`` headers)."""
    return Entry(
        path=normalize(path),
        type=headers.get("X-CallFS-Type", "file"),
        size=int(headers.get("X-CallFS-Size") or 0),
        mode=headers.get("X-CallFS-Mode", ""),
        owner=headers.get("X-CallFS-Owner", ""),
        mtime=headers.get("X-CallFS-MTime", ""),
    )


REMOTE_PREFIX = "callfs:"


def normalize(path: str) -> str:
    """``/a/b`` form: one leading slash, no trailing one (``/`` for the root); an optional
    ``callfs:`` prefix is dropped. ``.``/``..`` are left to the server, which resolves them."""
    if path.startswith(REMOTE_PREFIX):
        path = path[len(REMOTE_PREFIX) :]
    parts = [p for p in path.split("/") if p]
    return "/" + "/".join(parts)


def quote_path(path: str) -> str:
    """Each segment percent-encoded once (docs/api.md, "Paths"), without the leading slash."""
    return "/".join(urllib.parse.quote(p, safe="") for p in normalize(path).split("/") if p)


def files_url(base: str, path: str, *, directory: bool = False) -> str:
    quoted = quote_path(path)
    url = f"{base}/v1/files/{quoted}"
    return url + "/" if directory and quoted else url


def directories_url(base: str, path: str) -> str:
    return f"{base}/v1/directories/{quote_path(path)}"


def range_header(start: int, end: int | None) -> str:
    """``bytes=start-end`` with an exclusive ``end`` (Python slicing); ``None`` means to the end.
    A negative ``start`` (the last ``-start`` bytes) takes no ``end``: ``ValueError``, where the
    server would ignore the malformed header and send the whole file (found by audit)."""
    if start < 0 and end is None:
        return f"bytes={start}"  # the last -start bytes
    if start < 0 or (end is not None and end < 0):
        raise ValueError("a negative start takes no end, and an end is never negative")
    return f"bytes={start}-" if end is None else f"bytes={start}-{end - 1}"


def tus_metadata(path: str) -> str:
    """``Upload-Metadata`` naming the destination (the server reads its ``path`` entry)."""
    encoded = base64.b64encode(normalize(path).encode()).decode()
    return f"path {encoded}"


def base_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if not url:
        raise ValueError("a server URL is required (e.g. http://127.0.0.1:8443)")
    if "://" not in url:
        url = "http://" + url
    return url


def read_state(path: Path) -> dict[str, Any]:
    """A small JSON state file of the client (an empty map when missing or unreadable)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def write_state(path: Path, doc: dict[str, Any]) -> None:
    """Replace a state file atomically, readable by its user only (upload URLs and paths are
    not secrets, but they are the user's business)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
