"""``GET /v1/files/ws/{path}?mode=download|upload``: WebSocket transfers (API.md §9.9)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator

from aiohttp import WSCloseCode, WSMsgType, web

from callfs.api.files import get_file, owner_routed, request_path
from callfs.api.limits import cut_off
from callfs.api.sockets import direct_socket, tcp_option
from callfs.api.state import api_state, client_gone, identity
from callfs.core.peer import EXPECT_BLOB
from callfs.errors import (
    AlreadyExists,
    BadRequest,
    CallFSError,
    NotFound,
    ParentNotDirectory,
    PayloadTooLarge,
    PermissionDenied,
    RemoteOwner,
)
from callfs.model import INTERNAL_PROXY_USER

log = logging.getLogger(__name__)

WS_PREFIX = "/v1/files/ws"
FRAME = 65536
#: aiohttp's limit is exclusive: a message of exactly 1 MiB must pass.
MAX_MESSAGE = (1 << 20) + 1
UPLOAD_CAP = 100 * 1024 * 1024
MODES = ("download", "upload")


class UploadAborted(Exception):
    """The client ended the upload in a way that stores nothing (§9.9)."""

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(reason)


def origin_allowed(request: web.Request) -> bool:
    """A missing Origin is allowed; otherwise its host part must be exactly ``Host``."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    _, sep, rest = origin.partition("://")
    host = rest.split("/", 1)[0] if sep else ""
    return host == request.headers.get("Host", "")


async def transfer(request: web.Request) -> web.StreamResponse:
    if EXPECT_BLOB in request.headers and identity(request).user_id == INTERNAL_PROXY_USER:
        # another node reading a file of this one that lives under /ws/ (a link or a download
        # received there): its GET names the version it wants, and is a file read (§12.3)
        return await owner_routed(get_file)(request)
    path = request_path(request, WS_PREFIX)
    if path.dir_form:
        raise BadRequest("websocket transfer requires a file path")
    mode = request.rel_url.query.get("mode", "download").strip().lower() or "download"
    if mode not in MODES:
        raise BadRequest("mode must be one of: download, upload")
    state = api_state(request)
    identity(request)
    if mode == "upload":
        existing = await state.engine.find(path.path)
        if existing is not None and existing.is_dir:
            raise BadRequest("target path is a directory")
    # Buffered per WebSocket (aiohttp 3.14): one message being assembled (< MAX_MESSAGE), parsed
    # messages up to 128 KiB plus one before reading pauses, and one socket read; ~2.5 MiB at most.
    # ``timeout`` bounds the wait for the client's reply to our close frame.
    ws = web.WebSocketResponse(
        max_msg_size=MAX_MESSAGE, compress=False, autoclose=False, timeout=state.read_timeout
    )
    # RFC 6455 is version 13; aiohttp also takes the drafts' 7 and 8, which v1 refused
    if request.headers.get("Sec-WebSocket-Version", "").strip() != "13":
        raise BadRequest("not a WebSocket request")
    if not ws.can_prepare(request).ok:
        raise BadRequest("not a WebSocket request")
    if not origin_allowed(request):
        raise PermissionDenied()
    await ws.prepare(request)
    if mode == "download":
        await _download(ws, request, path.path)
    else:
        await _upload(ws, request, path.path)
    return ws


async def _download(ws: web.WebSocketResponse, request: web.Request, path: str) -> None:
    state = api_state(request)
    try:
        entry = await state.engine.stat(identity(request), request_path(request, WS_PREFIX))
        if entry.is_dir:
            raise NotFound()
    except CallFSError:
        await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"read access denied")
        return
    try:
        entry, stream = await state.engine.open_file(identity(request), entry)
    except CallFSError:
        await ws.close(code=WSCloseCode.INTERNAL_ERROR, message=b"failed to open file")
        return
    watch = _StallWatch(request, state.write_timeout)
    try:
        # TCP_CORK while the file streams (Linux): what the socket did not take goes out through
        # the transport in later writes; corked, no write leaves as a short packet of its own
        # (on a TCP_NODELAY socket a lone frame header did, and the client parsed it alone).
        sock = request.transport.get_extra_info("socket") if request.transport else None
        with tcp_option(sock, getattr(socket, "TCP_CORK", None), 1):
            async for chunk in stream:
                watch.sending()
                _send_frames(request, memoryview(chunk).cast("B"))
                watch.progress()
                await request.writer.drain()
                watch.reading()
    except (CallFSError, OSError) as exc:
        if watch.fired:
            return  # §2: the client stopped reading; cut off and counted
        if isinstance(exc, ConnectionError) and client_gone(request):
            # the client left mid-download: not a failure of ours (it logged a WARNING and a
            # traceback each time; found by audit)
            log.debug("websocket download ended: the client went away")
            return
        log.warning("websocket download of a file failed mid-way", exc_info=True)
        await ws.close(code=WSCloseCode.INTERNAL_ERROR, message=b"file read failed")
        return
    finally:
        watch.close()
        await stream.aclose()
    await ws.close(code=WSCloseCode.OK, message=b"download complete")


def _header(size: int) -> bytes:
    """The header of a final, unmasked binary frame (a server's) of ``size`` bytes."""
    if size < 126:
        return struct.pack("!BB", 0x82, size)
    if size < 65536:
        return struct.pack("!BBH", 0x82, 126, size)
    return struct.pack("!BBQ", 0x82, 127, size)


_FULL = _header(FRAME)
#: Buffers one ``writev`` takes (Linux's IOV_MAX); the rest goes through the transport.
_IOV_MAX = 1024


def _frames(view: memoryview) -> list[bytes | memoryview]:
    """``view`` as binary messages of at most FRAME bytes: headers and payloads, in order."""
    out: list[bytes | memoryview] = []
    for start in range(0, len(view), FRAME):
        piece = view[start : start + FRAME]
        out += (_FULL if len(piece) == FRAME else _header(len(piece)), piece)
    return out


def _send_frames(request: web.Request, view: memoryview) -> None:
    """Send ``view`` as frames: all of a chunk's frames in one ``writev`` on the socket when it
    may be written directly (``direct_socket``: not over TLS, nothing queued; the frames'
    headers and payloads as they are, no copy), what it did not take through the transport. The
    caller then waits for the transport to drain. aiohttp's ``send_bytes`` costs two writes per
    64 KiB frame (header, payload) and a coroutine: a 1 MiB chunk took 32 send calls, now one
    (the web socket's own writer sends the close frame after, in order, through the same
    transport)."""
    transport = request.transport
    if transport is None or client_gone(request):
        raise ConnectionResetError("the client went away")
    pieces = _frames(view)
    sock = direct_socket(transport)
    if sock is not None:
        try:
            sent = os.writev(sock.fileno(), pieces[:_IOV_MAX])
        except (BlockingIOError, InterruptedError):
            sent = 0
        while pieces and sent >= len(pieces[0]):
            sent -= len(pieces.pop(0))
        if pieces and sent:
            pieces[0] = memoryview(pieces[0])[sent:]
    if pieces:
        transport.write(b"".join(pieces))


class _StallWatch:
    """§2 for a WebSocket download: the connection is cut off once no byte has left for the
    client for ``stall`` seconds while there is some to send (checked every eighth of it, so
    within 1.125 x; the file's own reads are not the client's stall). Progress is a write, or
    the transport's queue getting shorter between two checks: a chunk's frames are queued at
    once, and a slow reader that keeps taking bytes is never cut off. A timer per frame cost a
    fifth of the download's speed (1,150-1,394 MB/s with, 1,449-1,710 without)."""

    def __init__(self, request: web.Request, stall: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._request = request
        self._stall = stall
        self._last = self._loop.time()
        self._sending = False
        self._queued = 0
        self.fired = False
        self._timer = self._loop.call_later(stall / 8, self._check)

    def sending(self) -> None:
        self._sending = True
        self.progress()

    def progress(self) -> None:
        self._last = self._loop.time()
        self._queued = self._queue()

    def reading(self) -> None:
        self._sending = False

    def _queue(self) -> int:
        transport = self._request.transport
        return transport.get_write_buffer_size() if transport is not None else 0

    def _check(self) -> None:
        queued = self._queue()
        if queued < self._queued:  # bytes left for the client since the last look
            self._last = self._loop.time()
        self._queued = queued
        if self._sending and self._loop.time() - self._last >= self._stall:
            self.fired = True
            cut_off(self._request)  # the pending send fails: the download loop ends
            return
        self._timer = self._loop.call_later(self._stall / 8, self._check)

    def close(self) -> None:
        self._timer.cancel()


async def _upload(ws: web.WebSocketResponse, request: web.Request, path: str) -> None:
    state = api_state(request)
    cap = min(UPLOAD_CAP, state.max_upload_size)
    ended_by_eof = False

    async def frames() -> AsyncIterator[bytes]:
        nonlocal ended_by_eof
        total = 0
        while True:
            try:
                # §22: an upload with no message for read_timeout is closed (pings do not count)
                async with asyncio.timeout(state.read_timeout):
                    msg = await ws.receive()
            except TimeoutError:
                state.metrics.connections_timed_out.labels(reason="websocket_idle").inc()
                raise UploadAborted(WSCloseCode.POLICY_VIOLATION, "idle timeout") from None
            if msg.type == WSMsgType.BINARY:
                total += len(msg.data)
                if total > cap:
                    raise UploadAborted(WSCloseCode.MESSAGE_TOO_BIG, "upload too large")
                yield msg.data
            elif msg.type == WSMsgType.TEXT:
                if msg.data == "EOF":
                    ended_by_eof = True
                    return
            elif msg.type == WSMsgType.CLOSE:
                if msg.data in (WSCloseCode.OK, WSCloseCode.GOING_AWAY):
                    return
                raise UploadAborted(WSCloseCode.OK, "upload aborted")
            elif msg.type == WSMsgType.ERROR:
                # aiohttp reports an over-size message as an error and has closed with 1009
                raise UploadAborted(WSCloseCode.MESSAGE_TOO_BIG, "message too large")
            else:  # CLOSING / CLOSED: the peer went away without a proper close
                raise UploadAborted(WSCloseCode.ABNORMAL_CLOSURE, "connection lost")

    try:
        existed = (await state.engine.find(path)) is not None
    except CallFSError:  # after the upgrade: a close frame, never an HTTP answer (§9.9)
        log.warning("websocket upload: metadata lookup failed", exc_info=True)
        await ws.close(code=WSCloseCode.INTERNAL_ERROR, message=b"metadata lookup failed")
        return
    body = frames()
    try:
        try:
            entry, _ = await state.engine.put_file(
                identity(request), request_path(request, WS_PREFIX), body
            )
            size = entry.size
        except RemoteOwner as owner:
            # §10: an existing file another node owns is replaced there; the write was
            # authorized here (put_file checks before routing), the frames stream through
            size = await state.peers.put_file(
                owner.instance_id, path, body, identity(request).user_id
            )
    except UploadAborted as exc:
        if not ws.closed:
            await ws.close(code=exc.code, message=exc.reason.encode())
        return
    except PermissionDenied:
        await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"write access denied")
        return
    except (BadRequest, AlreadyExists) as exc:
        if isinstance(exc, ParentNotDirectory):  # not the target: §9.9's other failures
            await ws.close(code=WSCloseCode.INTERNAL_ERROR, message=b"file create failed")
            return
        await ws.close(code=WSCloseCode.UNSUPPORTED_DATA, message=b"target path is not a file")
        return
    except PayloadTooLarge:
        await ws.close(code=WSCloseCode.MESSAGE_TOO_BIG, message=b"upload too large")
        return
    except (CallFSError, OSError):
        log.warning("websocket upload commit failed", exc_info=True)
        reason = b"file update failed" if existed else b"file create failed"
        await ws.close(code=WSCloseCode.INTERNAL_ERROR, message=reason)
        return
    try:
        await ws.send_str(f"ok:{size}")
    except (ConnectionError, RuntimeError):
        if ended_by_eof:
            log.info("websocket upload stored but the client left before the acknowledgement")
    await ws.close(code=WSCloseCode.OK, message=b"upload complete")


def add_routes(app: web.Application) -> None:
    # Registered before /v1/files/{tail}: GET here is always the WebSocket endpoint; other
    # methods fall through to the file handlers (§6.2).
    app.router.add_get(WS_PREFIX + r"/{tail:[\s\S]*}", transfer, allow_head=False)
