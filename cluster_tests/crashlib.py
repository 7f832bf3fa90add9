"""Helpers for ``test_crash_writes.py``: self-describing bodies and the client-side model.

A body is ``b"path|version-id|length|sha256hex\\n" + payload`` where ``payload`` is ``length``
pseudo-random bytes derived from the version id and ``sha256hex`` is the SHA-256 of the payload.
A reader can therefore tell a whole version from a truncated or mixed one without the model, and
the model (which keeps only version id -> SHA-256 of the whole body) tells which version it is.

The model is exact for every path except those touched by an operation whose outcome the client
never learned (the connection died: the server was killed while it was in flight). Such an
operation is *pending*: for the paths it touches, the acceptable observations are exactly the joint
state before it or the joint state after it, never anything else. Pending operations are resolved
(and the model collapsed to what was observed) at the next verification.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

Version = str  # a version id; None in a state map means "absent"


def make_body(path: str, version: Version, payload_len: int) -> bytes:
    payload = random.Random(version).randbytes(payload_len)
    digest = hashlib.sha256(payload).hexdigest()
    return f"{path}|{version}|{payload_len}|{digest}\n".encode() + payload


def parse_body(body: bytes) -> tuple[Version | None, str]:
    """``(version, "")`` for a whole, self-consistent body; ``(None, why)`` otherwise."""
    nl = body.find(b"\n")
    if nl < 0:
        return None, f"no header line ({len(body)} bytes)"
    try:
        _path, version, length_s, digest = body[:nl].decode().split("|")
        length = int(length_s)
    except (UnicodeDecodeError, ValueError):
        return None, f"unparsable header {body[:nl][:120]!r}"
    payload = body[nl + 1 :]
    if len(payload) != length:
        return None, f"version {version}: payload {len(payload)} bytes, header says {length}"
    if hashlib.sha256(payload).hexdigest() != digest:
        return None, f"version {version}: payload sha256 differs from its header (mixed bytes)"
    return version, ""


@dataclass
class Op:
    kind: str  # PUT, POST, PATCH, DELETE
    paths: tuple[str, ...]
    before: dict[str, Version | None]
    after: dict[str, Version | None]  # the state the paths reach if the op takes effect
    expect: int  # the status the exact model predicts
    seq: int = 0


@dataclass
class Model:
    paths: list[str]
    state: dict[str, Version | None] = field(default_factory=dict)
    #: version id -> SHA-256 of the whole body written for it
    versions: dict[Version, str] = field(default_factory=dict)
    pending: list[Op] = field(default_factory=list)
    tainted: set[str] = field(default_factory=set)
    violations: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for p in self.paths:
            self.state.setdefault(p, None)

    def acked(self, op: Op) -> None:
        self.state.update(op.after)

    def violation(self, text: str, paths: tuple[str, ...] = ()) -> None:
        self.violations.append(text)
        self.tainted.update(paths)

    def pending_for(self, path: str) -> Op | None:
        for op in self.pending:
            if path in op.paths:
                return op
        return None
