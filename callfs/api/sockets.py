"""TCP options held on a connection for the length of one response."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator


@contextlib.contextmanager
def tcp_option(sock: socket.socket | None, option: int | None, value: int) -> Iterator[bool]:
    """Set IPPROTO_TCP ``option`` to ``value`` on ``sock`` inside the block and back to 0 after
    it; yields whether it could be set (no socket, an option this platform lacks or a refusal:
    False, and nothing to undo)."""
    if sock is None or option is None:
        yield False
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, option, value)
    except OSError:
        yield False
        return
    try:
        yield True
    finally:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, option, 0)
