"""Path canonicalisation (API.md §6), done once at the edge; everything below uses engine paths."""

from __future__ import annotations

import re
from dataclasses import dataclass

from callfs.errors import BadRequest
from callfs.model import name_of, parent_of

MAX_SEGMENT_BYTES = 255
MAX_PATH_BYTES = 4096
RESERVED_FIRST_SEGMENT = ".erasure"

# U+0000-U+001F except TAB, and the bidi controls U+202A-U+202E, U+2066-U+2069 (§6.1 step 6;
# DEL and the C1 range stay legal, as the contract says). Also lone surrogates U+D800-U+DFFF:
# a JSON body can carry one (``"\ud800"``), UTF-8 cannot store it (it was a 500).
_FORBIDDEN = re.compile("[\x00-\x08\x0a-\x1f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")


def _invalid(why: str = "") -> BadRequest:
    return BadRequest(f"invalid path: {why}" if why else "invalid path")


_TOO_LONG_NAME = f"a name is longer than {MAX_SEGMENT_BYTES} bytes"
_TOO_LONG_PATH = f"longer than {MAX_PATH_BYTES} bytes"


@dataclass(frozen=True, slots=True)
class CanonicalPath:
    """An engine path (``/`` or ``/a/b``) and whether the request used directory form (``x/``)."""

    path: str
    dir_form: bool = False

    @property
    def name(self) -> str:
        return name_of(self.path)

    @property
    def parent(self) -> str:
        return parent_of(self.path)

    @property
    def is_root(self) -> bool:
        return self.path == "/"


def _decode_piece(piece: str) -> str:
    """Percent-decode one ``/``-separated piece exactly once (``+`` stays ``+``)."""
    if "%" not in piece:
        return piece
    out = bytearray()
    i = 0
    n = len(piece)
    while i < n:
        ch = piece[i]
        if ch == "%":
            m = _ESCAPE.match(piece, i)
            if m is None:
                raise _invalid()
            out.append(int(m.group(1), 16))
            i += 3
        else:
            out += ch.encode("utf-8")
            i += 1
    try:
        decoded = out.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _invalid() from exc
    if "/" in decoded:
        raise _invalid()
    return decoded


def after_prefix(raw_path: str, prefix: str) -> str:
    """The raw (still percent-encoded) request path after the route prefix ``prefix`` (§6.1),
    without its leading ``/``. The router matched the decoded path, so the prefix may be spelled
    with escapes (``/v1/%66iles/x`` is ``/v1/files/x``, as URIs compare): it is cut as many
    segments as it has, never as many characters (which made that POST create ``/es/x``)."""
    bare = prefix.rstrip("/")
    if raw_path.startswith(bare):
        rest = raw_path[len(bare) :]  # one "/" is the prefix's own, however it is spelled
        return rest[1:] if rest.startswith("/") else rest
    segments = bare.count("/")
    cut = raw_path.split("/", segments + 1)
    return cut[segments + 1] if len(cut) > segments + 1 else ""


def parse_request_path(raw: str) -> CanonicalPath:
    """Steps 1-10 of §6.1 on the raw (still percent-encoded) path after the route prefix."""
    return _canonical("/".join(_decode_piece(p) for p in raw.split("/")))


def parse_body_path(value: str) -> CanonicalPath:
    """Steps 2-10 (no percent-decoding), for the link ``path`` and PATCH ``destination`` (§6.2)."""
    return _canonical(value)


def _canonical(s: str) -> CanonicalPath:
    if s.startswith("/"):
        s = s[1:]
    dir_form = False
    if s.endswith("/"):
        dir_form = True
        s = s[:-1]
    if s in ("", "."):
        return CanonicalPath("/", True)
    if "\\" in s or _FORBIDDEN.search(s):
        raise _invalid()
    stack: list[str] = []
    for seg in s.split("/"):
        if seg in ("", "."):
            continue
        if seg == "..":
            if not stack:  # escaping paths are rejected, never clamped
                raise _invalid()
            stack.pop()
            continue
        stack.append(seg)
    # step 9 on the cleaned path: a long segment that a later ``..`` removed is no error
    if any(
        len(seg) * 4 > MAX_SEGMENT_BYTES and len(seg.encode()) > MAX_SEGMENT_BYTES for seg in stack
    ):
        raise _invalid(_TOO_LONG_NAME)
    path = "/" + "/".join(stack)
    if len(path.encode("utf-8")) > MAX_PATH_BYTES:
        raise _invalid(_TOO_LONG_PATH)
    if stack and stack[0] == RESERVED_FIRST_SEGMENT:
        raise _invalid()
    # ``a/..`` is the root in file form: only a trailing ``/`` (or step 4) makes directory form
    return CanonicalPath(path, dir_form)


def validate_name(name: str) -> None:
    """A PATCH ``name``: no ``/``, not ``.`` or ``..``, and steps 6 and 9 (§6.2)."""
    if not name or "/" in name or name in (".", ".."):
        raise BadRequest("invalid name")
    if _FORBIDDEN.search(name):
        raise BadRequest("invalid name")
    if len(name.encode("utf-8")) > MAX_SEGMENT_BYTES:
        raise BadRequest(f"invalid name: longer than {MAX_SEGMENT_BYTES} bytes")
