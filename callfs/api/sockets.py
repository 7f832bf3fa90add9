"""TCP options held on a connection for the length of one response, and the socket a response
may write to directly."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from typing import Any


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


def direct_socket(transport: asyncio.BaseTransport | None) -> Any:
    """The TCP socket under ``transport`` when bytes may be written to it directly, bypassing
    the transport (``os.sendfile``, ``os.writev``): on asyncio's selector loops (uvloop's socket
    object cannot send), without TLS (the socket carries ciphertext) and with nothing of the
    transport's own still queued (it would go out after ours). None otherwise: write through the
    transport."""
    if transport is None or transport.is_closing():
        return None
    if not isinstance(asyncio.get_running_loop(), asyncio.SelectorEventLoop):
        return None
    if transport.get_extra_info("sslcontext") is not None:
        return None
    if not isinstance(transport, asyncio.WriteTransport) or transport.get_write_buffer_size():
        return None
    return transport.get_extra_info("socket")
