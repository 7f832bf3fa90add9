"""``/v1/files/{path}``: GET, HEAD, POST, PUT, DELETE, PATCH (API.md §9.3–9.8)."""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
import os
import platform
import re
import select
import socket
import sys
import time
from asyncio.exceptions import SendfileNotAvailableError
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from contextlib import aclosing
from typing import Any

from aiohttp import HttpVersion11, web
from aiohttp.typedefs import Handler

from callfs.api.erasure import erasure_request, manifest_response
from callfs.api.errors import dumps, json_response
from callfs.api.limits import cut_off
from callfs.api.proxy import BODY_READ, forward
from callfs.api.ranges import parse_range
from callfs.api.sockets import direct_socket, tcp_option
from callfs.api.state import CONTINUE_PENDING, IDENTITY, api_state, identity
from callfs.core.engine import MoveRequest
from callfs.core.peer import CALLER, EXPECT_BLOB
from callfs.errors import BadRequest, CallFSError, PayloadTooLarge, RemoteOwner, VersionMoved
from callfs.metadata.base import ChildPosition
from callfs.model import INTERNAL_PROXY_USER, BackendType, Entry, EntryType, Identity
from callfs.paths import (
    CanonicalPath,
    after_prefix,
    parse_body_path,
    parse_request_path,
    validate_name,
)
from callfs.storage.base import ByteStream

log = logging.getLogger(__name__)

FILES_PREFIX = "/v1/files"
#: The route tail: any path, newlines included (``.*`` would not match a decoded ``%0a``, and the
#: request would get a 404 instead of the 400 that path validation gives it).
ANY_TAIL = r"/{tail:[\s\S]*}"
OCTET = "application/octet-stream"
MAX_PATCH_BODY = 1 << 20
#: Ranges below this go out with ``write``; larger local files use sendfile (zero-copy).
_SENDFILE_MIN = 256 * 1024
#: Without the kernel's stall guard (``_TCP_USER_TIMEOUT``), sendfile goes out in slices of this
#: size, each of which must leave within ``write_timeout`` (§2): progress is seen per slice, so a
#: reader must take 256 KiB per write_timeout (8.7 KB/s at 30 s). Slices cost: loopback, 200 MB:
#: 1 MiB +5 %, 256 KiB +35 %, 64 KiB +125 % over one sendfile; a 1 MiB GET at 16 connections
#: served 1,024-1,075 requests/s in 256 KiB slices and 1,583-1,815 in one call.
_SENDFILE_SLICE = 256 * 1024
#: Streamed (not sendfile) downloads are written in slices of at most this size, each of which
#: must leave within ``write_timeout``.
_WRITE_SLICE = 256 * 1024


def _zero_window_user_timeout() -> int | None:
    """The TCP_USER_TIMEOUT option where it also cuts a peer that keeps acknowledging zero-window
    probes, a reader that stopped reading (Linux 5.11 and later), else None."""
    option: int | None = getattr(socket, "TCP_USER_TIMEOUT", None)
    if option is None or sys.platform != "linux":
        return None
    numbers = re.match(r"(\d+)\.(\d+)", platform.release())
    if numbers is None or (int(numbers[1]), int(numbers[2])) < (5, 11):
        return None
    return option


_TCP_USER_TIMEOUT = _zero_window_user_timeout()


@functools.lru_cache(maxsize=4096)
def rfc3339(seconds: int) -> str:
    """Cached: the same few mtimes are formatted on every GET/HEAD of the same files."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


#: Raw paths up to this long have their (immutable) canonical form cached; longer ones are
#: parsed every time, so the cache stays small (at most _PATH_CACHE entries of short strings).
_PATH_CACHE_MAX_LEN = 256
_PATH_CACHE = 2048
_parse_cached = functools.lru_cache(maxsize=_PATH_CACHE)(parse_request_path)


def request_path(request: web.Request, prefix: str = FILES_PREFIX) -> CanonicalPath:
    """Canonical path of the raw (still percent-encoded) request path after ``prefix``."""
    raw = after_prefix(request.rel_url.raw_path, prefix)
    if len(raw) <= _PATH_CACHE_MAX_LEN:
        return _parse_cached(raw)  # a BadRequest is raised again each time, never cached
    return parse_request_path(raw)


def entry_json(entry: Entry) -> dict[str, Any]:
    return {
        "name": entry.name,
        "path": entry.path,
        "type": entry.type.value,
        "size": entry.size,
        "mode": entry.mode,
        "owner": entry.owner,
        "mtime": rfc3339(entry.mtime),
    }


def listing_body(children: list[Entry]) -> bytes:
    """A directory GET's body (HEAD reports its length)."""
    return dumps([entry_json(c) for c in children]).encode()


# ---- listing pages and streams (§22) ---------------------------------------------------------
#: A listing longer than this streams: the body is written a store page at a time (flat memory).
LISTING_PAGE = 1000
#: The largest ``limit`` a client may ask for.
MAX_LIST_LIMIT = 10000
_LIMIT = re.compile(r"[0-9]{1,9}")
_CURSOR_TYPES = {"f": EntryType.FILE, "d": EntryType.DIRECTORY}


def encode_cursor(entry: Entry) -> str:
    """The ``next`` cursor past ``entry``: ``f/`` or ``d/`` (its type), then its name in unpadded
    base64url. Opaque to clients, URL-safe, and never a name: names cannot contain ``/``."""
    name = base64.urlsafe_b64encode(entry.name.encode()).rstrip(b"=").decode()
    return f"{entry.type.value[0]}/{name}"


def parse_after(raw: str) -> ChildPosition | str:
    """A cursor (it has a ``/``) as the (type, name) position it encodes, or a plain name."""
    kind, slash, b64 = raw.partition("/")
    if not slash:
        try:
            validate_name(raw)
        except BadRequest as exc:
            raise BadRequest("invalid after: not a name or a cursor") from exc
        return raw
    try:
        if kind not in _CURSOR_TYPES or not re.fullmatch(r"[A-Za-z0-9_-]+", b64):
            raise ValueError(raw)
        name = base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4)).decode()
        validate_name(name)
    except (ValueError, BadRequest) as exc:
        raise BadRequest("invalid after: not a name or a cursor") from exc
    return _CURSOR_TYPES[kind], name


def parse_page_query(query: Mapping[str, str]) -> tuple[int, ChildPosition | str | None] | None:
    """``limit`` (1..MAX_LIST_LIMIT) and ``after`` (a name or a cursor), or None for neither.
    ``after`` without ``limit`` is refused."""
    raw_limit, raw_after = query.get("limit"), query.get("after")
    if raw_limit is None:
        if raw_after is not None:
            raise BadRequest("after needs limit")
        return None
    if not _LIMIT.fullmatch(raw_limit) or not 1 <= int(raw_limit) <= MAX_LIST_LIMIT:
        raise BadRequest(f"invalid limit: an integer from 1 to {MAX_LIST_LIMIT}")
    return int(raw_limit), None if raw_after is None else parse_after(raw_after)


def _items_json(entries: list[Entry]) -> bytes:
    """Entries as the comma-joined items of a JSON array (``dumps`` of the list, less ``[]``)."""
    return ",".join(dumps(entry_json(e)) for e in entries).encode()


async def listing_chunks(
    request: web.Request, directory: Entry, first: list[Entry]
) -> AsyncGenerator[bytes, None]:
    """A whole listing's items, comma-joined, a page per chunk: ``first`` (the first
    ``LISTING_PAGE`` children, already read), then the rest read from the store a page at a time."""
    yield _items_json(first)
    if len(first) < LISTING_PAGE:
        return
    after = (first[-1].type, first[-1].name)
    pages = api_state(request).engine.directory_pages(directory, after, LISTING_PAGE)
    async with aclosing(pages):
        async for page in pages:
            yield b"," + _items_json(page)


async def send_listing(
    request: web.Request,
    headers: dict[str, str],
    head: bytes,
    chunks: AsyncGenerator[bytes, None],
    tail: bytes,
) -> web.StreamResponse:
    """Stream ``head``, the chunks and ``tail`` as a chunked JSON body; each write must go out
    within ``server.write_timeout``. A store failure midway cuts the connection (the status line
    is out): the client sees a truncated body, never a short but well-formed listing."""
    resp = web.StreamResponse(status=200, headers=headers)
    resp.content_type = "application/json"
    await resp.prepare(request)
    stall = api_state(request).write_timeout
    pending = head
    try:
        async with aclosing(chunks):
            async for chunk in chunks:
                async with asyncio.timeout(stall):
                    await resp.write(pending + chunk)
                pending = b""
        async with asyncio.timeout(stall):
            await resp.write(pending + tail)
    except TimeoutError:
        cut_off(request)
        return resp
    except (CallFSError, OSError) as exc:
        log.warning("a directory listing failed mid-stream: %s; cutting the connection", exc)
        cut_off(request)
        return resp
    await resp.write_eof()
    return resp


async def _first_page(
    request: web.Request, path: CanonicalPath, headers: dict[str, str]
) -> tuple[list[Entry], bool]:
    """The first page of a files-route directory listing and whether it streams (no ``limit``,
    more than ``LISTING_PAGE`` children); with ``limit``, ``X-CallFS-Next`` when more remain."""
    page = parse_page_query(request.rel_url.query)
    limit, after = (LISTING_PAGE, None) if page is None else page
    _, items = await api_state(request).engine.list_directory(
        identity(request), path, recursive=False, max_depth=0, after=after, limit=limit + 1
    )
    more = len(items) > limit
    del items[limit:]
    if page is not None and more:
        headers["X-CallFS-Next"] = encode_cursor(items[-1])
    return items, page is None and more


async def directory_listing(
    request: web.Request, path: CanonicalPath, entry: Entry
) -> web.StreamResponse:
    """GET of a directory on the files route (§9.3): the children as a JSON array. With
    ``limit``: one page of it (§22). Without, a listing longer than ``LISTING_PAGE`` streams
    (chunked: no ``Content-Length``)."""
    headers = item_headers(entry)
    items, streams = await _first_page(request, path, headers)
    if streams:
        chunks = listing_chunks(request, entry, items)
        return await send_listing(request, headers, b"[", chunks, b"]")
    resp = web.Response(body=listing_body(items), headers=headers)
    resp.content_type = "application/json"
    return resp


async def directory_head(
    request: web.Request, path: CanonicalPath, entry: Entry, headers: dict[str, str]
) -> None:
    """HEAD of a directory: ``Content-Length`` of the body GET would send, counted a page at a
    time for a streamed listing (flat memory), and ``X-CallFS-Next`` as GET."""
    items, streams = await _first_page(request, path, headers)
    if not streams:
        headers["Content-Length"] = str(len(listing_body(items)))
        return
    length = 2  # the brackets
    chunks = listing_chunks(request, entry, items)
    async with aclosing(chunks):
        async for chunk in chunks:
            length += len(chunk)
    headers["Content-Length"] = str(length)


def item_headers(entry: Entry) -> dict[str, str]:
    return {
        "X-CallFS-Type": entry.type.value,
        "X-CallFS-Size": str(entry.size),
        "X-CallFS-Mode": entry.mode,
        "X-CallFS-Owner": entry.owner,
        "X-CallFS-MTime": rfc3339(entry.mtime),
    }


async def defer_continue(request: web.Request) -> None:
    """Expect handler of the file routes. aiohttp's default sends ``100 Continue`` before any
    middleware runs; here it is only noted, and sent by ``send_continue`` when the handler first
    reads the body: after authentication, the size check and authorization, so a refused upload
    is answered without the client ever sending its body. Other expectations are ignored."""
    expect = request.headers.get("Expect", "")
    if request.version == HttpVersion11 and expect.lower() == "100-continue":
        request[CONTINUE_PENDING] = True


async def send_continue(request: web.Request) -> None:
    """Send the interim ``100 Continue`` that ``defer_continue`` held back, once."""
    if request.get(CONTINUE_PENDING):
        request[CONTINUE_PENDING] = False
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # as aiohttp's own handler: the response has not started


async def body_chunks(request: web.Request, limit: int) -> AsyncIterator[bytes]:
    """The request body as it arrives, never whole; ``PayloadTooLarge`` past ``limit``;
    ``BadRequest`` when the client stalls longer than ``server.read_timeout`` (§2)."""
    total = 0
    stall = api_state(request).read_timeout
    await send_continue(request)
    while True:
        try:
            async with asyncio.timeout(stall):
                chunk = await request.content.readany()
        except TimeoutError as exc:
            raise BadRequest("timed out reading the request body") from exc
        if not chunk:
            return
        total += len(chunk)
        if total > limit:
            raise PayloadTooLarge()
        yield chunk


def check_declared_size(request: web.Request) -> None:
    length = request.content_length
    if length is not None and length > api_state(request).max_upload_size:
        raise PayloadTooLarge()


# ---- GET / HEAD ------------------------------------------------------------------------------
async def get_file(request: web.Request) -> web.StreamResponse:
    path = request_path(request)
    state = api_state(request)
    who = identity(request)
    entry = await state.engine.stat(who, path)
    # Another node relaying a GET names the version it looked up: any other one here (a file
    # replaced since, a directory now) is 412 before the range or a listing is decided on it.
    expected = request.headers.get(EXPECT_BLOB) if who.user_id == INTERNAL_PROXY_USER else None
    if expected is not None and expected != entry.blob_key:
        raise VersionMoved()
    if entry.is_dir:
        return await directory_listing(request, path, entry)
    if (
        entry.backend_type is BackendType.ERASURE
        and request.rel_url.query.get("manifest") == "true"
    ):
        return manifest_response(request, entry, await state.engine.erasure_layout(entry))
    ranges = request.headers.getall("Range", ())
    # two Range fields are two ranges: the full 200, as for any multi-range request (§9.3)
    wanted, if_range = (ranges[0] if len(ranges) == 1 else None), request.headers.get("If-Range")
    span: tuple[int, int] | None = None  # of the version opened: ``window`` runs last on it

    def window(version: Entry) -> tuple[int, int | None]:
        nonlocal span
        if expected is not None and expected != version.blob_key:
            raise VersionMoved()  # replaced between this node's stat and its open
        span = parse_range(wanted, version.size, if_range)
        return (0, None) if span is None else (span[0], span[1] - span[0] + 1)

    # ``entry`` becomes the version actually opened (a replace may land between stat and open)
    entry, stream = await state.engine.open_file(who, entry, window)
    headers = item_headers(entry)
    headers["Accept-Ranges"] = "bytes"
    status = 200
    if span is not None:
        status = 206
        headers["Content-Range"] = f"bytes {span[0]}-{span[0] + stream.length - 1}/{entry.size}"
    return await send_stream(request, stream, status, headers)


async def send_stream(
    request: web.Request, stream: ByteStream, status: int, headers: dict[str, str]
) -> web.StreamResponse:
    """Send a ByteStream: tiny local reads inline, big local files by sendfile, others chunked."""
    try:
        small: bytes | None = getattr(stream, "small_body", None)
        if small is not None:
            resp = web.Response(status=status, body=small, headers=headers)
            resp.content_type = OCTET
            return resp
        sresp = web.StreamResponse(status=status, headers=headers)
        sresp.content_type = OCTET
        sresp.content_length = stream.length
        await sresp.prepare(request)
        fileobj = getattr(stream, "fileobj", None)
        transport = request.transport
        if (
            fileobj is not None
            and transport is not None
            and stream.length >= _SENDFILE_MIN
            and transport.get_extra_info("sslcontext") is None
        ):
            try:
                offset = getattr(stream, "offset", 0)
                if await _sendfile(request, transport, fileobj, offset, stream.length):
                    await sresp.write_eof()
                return sresp
            except NotImplementedError:
                pass  # a loop without sendfile (uvloop): stream it instead
            except ConnectionError:
                _hang_up(request)  # the client went away: nothing to answer, nothing to log
                return sresp
            except OSError as exc:  # the disk failed under sendfile (EIO): the status line is out
                log.warning("a download failed mid-stream: %s; cutting the connection", exc)
                _hang_up(request)
                return sresp
        stall = api_state(request).write_timeout
        try:
            async for chunk in stream:
                # Written in slices, each with its own stall timer: a chunk may be big (S3
                # reads grow to 4 MiB), and a slow but steady reader must only take one slice
                # per write_timeout.
                for piece in _slices(chunk):
                    try:
                        async with asyncio.timeout(stall):
                            await sresp.write(piece)
                    except TimeoutError:
                        cut_off(request)
                        return sresp
        except ConnectionError:
            _hang_up(request)  # the client went away: not a stall, not a failure of ours
            return sresp
        except (CallFSError, OSError) as exc:
            # The status line is out: the only honest answer left is a short body (the client
            # sees the connection close before Content-Length bytes), never a wrong one.
            log.warning("a download failed mid-stream: %s; cutting the connection", exc)
            _hang_up(request)
            return sresp
        await sresp.write_eof()
        return sresp
    finally:
        await stream.aclose()


def _hang_up(request: web.Request) -> None:
    """End a response mid-body: abort, as the client cannot be given a whole one (not a
    ``write_stall``: that is ``cut_off``, for a client that stopped reading)."""
    if request.transport is not None:
        request.transport.abort()


def _slices(chunk: bytes | bytearray | memoryview) -> Sequence[bytes | bytearray | memoryview]:
    if len(chunk) <= _WRITE_SLICE:
        return (chunk,)
    view = memoryview(chunk)
    return [view[i : i + _WRITE_SLICE] for i in range(0, len(view), _WRITE_SLICE)]


async def _sendfile(
    request: web.Request, transport: asyncio.Transport, fileobj: Any, offset: int, count: int
) -> bool:
    """Zero-copy send, cut off when the reader stalls for ``server.write_timeout`` (``loop.
    sendfile`` alone waits for a stalled reader forever). False when the client was cut off; a
    cancelled ``loop.sendfile`` leaves the stream mid-way, so the connection goes too."""
    loop = asyncio.get_running_loop()
    stall = api_state(request).write_timeout
    # Linux 5.11+: the kernel aborts the connection once sent bytes stay unacknowledged for
    # write_timeout (TCP_USER_TIMEOUT; a reader that stopped reading is probed through its zero
    # window and cut the same way), so one sendfile covers the whole range and a slow reader that
    # keeps taking bytes is never cut.
    sock = transport.get_extra_info("socket")
    with tcp_option(sock, _TCP_USER_TIMEOUT, round(stall * 1000)) as watched:
        if watched:
            started = time.monotonic()
            sent = _sendfile_now(transport, fileobj, offset, count)
            if sent == count:
                return True
            try:
                await loop.sendfile(
                    transport, fileobj, offset + sent, count - sent, fallback=sent == 0
                )
            except TimeoutError:  # ETIMEDOUT: the kernel gave up on the reader
                cut_off(request)
                return False
            except SendfileNotAvailableError:
                # asyncio reports a sendfile that fails before its first byte so (it would fall
                # back to write(), which is why it is off here: sendfile just worked). No byte
                # left during the whole call: a stall, if it lasted write_timeout; a reset else.
                if time.monotonic() - started >= stall:
                    cut_off(request)
                    return False
                if _peer_closed(sock):
                    raise ConnectionResetError("the client went away during sendfile") from None
                raise OSError("sendfile failed mid-download (the file could not be read)") from None
            return True
    end = offset + count
    while offset < end:
        size = min(_SENDFILE_SLICE, end - offset)
        try:
            async with asyncio.timeout(stall):
                await loop.sendfile(transport, fileobj, offset, size)
        except TimeoutError:
            cut_off(request)
            return False
        offset += size
    return True


def _peer_closed(sock: socket.socket) -> bool:
    """Whether the peer of ``sock`` reset or closed the connection (what else makes sendfile
    fail on a connection that is not stalled is the file: a disk error)."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLOUT)
    events = poller.poll(0)
    return bool(events and events[0][1] & (select.POLLERR | select.POLLHUP))


def _sendfile_now(transport: asyncio.Transport, fileobj: Any, offset: int, count: int) -> int:
    """One sendfile call straight from the handler, for what the socket buffer takes now (all of
    it, mostly, up to a few MiB): the bytes sent. ``loop.sendfile`` costs a future, a pause and
    resume of reading and a seek even when one call does it all (GET 1 MiB, 16 connections:
    2,173-2,320 -> 2,553-2,714 requests/s). Only on asyncio's selector loops, whose
    ``loop.sendfile`` takes over for the rest, and only with nothing of the transport's own
    still queued (``direct_socket``)."""
    sock = direct_socket(transport)
    if sock is None:
        return 0
    try:
        return os.sendfile(sock.fileno(), fileobj.fileno(), offset, count)
    except BlockingIOError:
        return 0


async def head_file(request: web.Request) -> web.StreamResponse:
    path = request_path(request)
    state = api_state(request)
    # Answered from metadata on the receiving node (§22): the owner node need not be up.
    entry = await state.engine.stat(identity(request), path)
    headers = item_headers(entry)
    if entry.is_dir:
        content_type = "application/json"
        await directory_head(request, path, entry, headers)
    else:
        content_type = OCTET
        headers["Accept-Ranges"] = "bytes"
        headers["Content-Length"] = str(entry.size)
    if entry.instance_id is not None:
        headers["X-CallFS-Instance-ID"] = entry.instance_id
    headers["Content-Type"] = content_type
    return web.Response(status=200, headers=headers)


# ---- POST / PUT ------------------------------------------------------------------------------
async def post_file(request: web.Request) -> web.StreamResponse:
    path = request_path(request)
    state = api_state(request)
    who = identity(request)
    if path.dir_form:
        created = await state.engine.make_directory(who, path)
        return web.Response(status=201 if created else 200)
    check_declared_size(request)
    erasure = erasure_request(request) if state.engine.settings.erasure_enabled else None
    await state.engine.create_file(who, path, body_chunks(request, state.max_upload_size), erasure)
    return web.Response(status=201)


async def put_file(request: web.Request) -> web.StreamResponse:
    path = request_path(request)
    if path.dir_form:
        raise BadRequest("PUT requires a file path, not a directory path")
    check_declared_size(request)
    state = api_state(request)
    _, created = await state.engine.put_file(
        identity(request), path, body_chunks(request, state.max_upload_size)
    )
    return web.Response(status=201 if created else 200)


# ---- DELETE ----------------------------------------------------------------------------------
async def delete_file(request: web.Request) -> web.StreamResponse:
    path = request_path(request)
    recursive = request.rel_url.query.get("recursive") == "true"
    await api_state(request).engine.delete(identity(request), path, recursive)
    return web.Response(status=204)


# ---- PATCH -----------------------------------------------------------------------------------
def _optional_str(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest(f"{key} must be a string")
    return value


def _optional_bool(body: dict[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadRequest(f"{key} must be a boolean")
    return value


async def read_json_object(request: web.Request, limit: int, message: str) -> dict[str, Any]:
    """A JSON object body of at most ``limit`` bytes, or ``BadRequest(message)``."""
    if request.content_length is not None and request.content_length > limit:
        raise BadRequest(message)
    data = bytearray()
    await send_continue(request)
    async for chunk in request.content.iter_any():
        data += chunk
        if len(data) > limit:
            raise BadRequest(message)
    request[BODY_READ] = bytes(data)  # if the item lives elsewhere, the proxy forwards these
    try:
        # strict JSON (RFC 8259): UTF-8 only (``json.loads`` of bytes also guesses UTF-16/32;
        # a leading BOM is ignored, as the RFC allows and as before), and no NaN / Infinity
        body = json.loads(data.decode("utf-8-sig"), parse_constant=_not_json)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(message) from exc
    if not isinstance(body, dict):
        raise BadRequest(message)
    return body


def parse_move(source: CanonicalPath, body: dict[str, Any], overwrite_query: bool) -> MoveRequest:
    name = _optional_str(body, "name") or None
    destination = _optional_str(body, "destination") or None
    if (name is None) == (destination is None):
        raise BadRequest("exactly one of name and destination is required")
    if name is not None:
        validate_name(name)
        base = source.parent if source.path != "/" else "/"
        target = parse_body_path(base.rstrip("/") + "/" + name)
    else:
        assert destination is not None
        target = parse_body_path(destination)
    return MoveRequest(
        destination=target,
        backend=_optional_str(body, "backend") or None,
        instance=_optional_str(body, "instance") or None,
        overwrite=_optional_bool(body, "overwrite") or overwrite_query,
        create_parents=_optional_bool(body, "create_parents"),
    )


async def patch_file(request: web.Request) -> web.StreamResponse:
    path = request_path(request)
    body = await read_json_object(request, MAX_PATCH_BODY, "invalid JSON body")
    move = parse_move(path, body, request.rel_url.query.get("overwrite") == "true")
    engine = api_state(request).engine
    if move.instance is not None and move.backend is None and move.destination.path == path.path:
        found = await engine.find(path.path)
        if found is not None and found.is_dir:
            # every file below moves to that node, each its own switch; partial: 502 + report
            report = await engine.relocate_tree(identity(request), path, move.instance)
            answer: dict[str, Any] = {"path": path.path, **report.as_dict()}
            if report.failed:
                answer.update(code="PEER_UNAVAILABLE", message="some files could not be moved")
            return json_response(answer, status=502 if report.failed else 200, newline=True)
    new_path = await engine.move(identity(request), path, move)
    return json_response({"path": new_path}, newline=True)


_SUGGESTIONS = {
    (True, True): "Directory already exists on another server. Use GET to access it.",
    (True, False): "Path exists as file on another server, cannot create directory",
    (False, False): "File already exists on another server. Use PUT to update it.",
    (False, True): "Path exists as directory on another server, cannot create file",
}


def cross_server_conflict(request: web.Request, exc: RemoteOwner) -> web.Response:
    """The §8 shape-2 409 for a POST onto an item owned by another node."""
    want_dir = request_path(request).dir_form
    body: dict[str, Any] = {
        "error": "Resource exists on another server",
        "existing_path": exc.path,
        "instance_id": exc.instance_id,
        "backend_type": exc.backend_type,
        "suggestion": _SUGGESTIONS[(want_dir, exc.is_dir)],
    }
    endpoint = api_state(request).peers.endpoint(exc.instance_id)
    if not want_dir and not exc.is_dir and endpoint is not None:
        body["update_url"] = f"{endpoint}/v1/files{exc.path}"
    return json_response(body, status=409)


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def _act_for_caller(request: web.Request) -> None:
    acting = request.headers.get(CALLER)
    if acting and identity(request).user_id == INTERNAL_PROXY_USER:
        request[IDENTITY] = Identity(acting)


def owner_routed(handler: Handler) -> Handler:
    """Send the request to the owner node when the item lives there (§12.2)."""

    async def routed(request: web.Request) -> web.StreamResponse:
        _act_for_caller(request)
        try:
            return await handler(request)
        except RemoteOwner as exc:
            if request.method == "POST":
                return cross_server_conflict(request, exc)
            await send_continue(request)  # the owner node reads the body through this one
            return await forward(
                api_state(request).peers,
                request,
                exc.instance_id,
                set_headers={CALLER: identity(request).user_id},
            )

    return routed


def add_routes(app: web.Application) -> None:
    for pattern in (FILES_PREFIX, FILES_PREFIX + ANY_TAIL):
        resource = app.router.add_resource(pattern)
        for method, handler in (
            ("GET", get_file),
            ("HEAD", head_file),
            ("POST", post_file),
            ("PUT", put_file),
            ("DELETE", delete_file),
            ("PATCH", patch_file),
        ):
            resource.add_route(method, owner_routed(handler), expect_handler=defer_continue)
