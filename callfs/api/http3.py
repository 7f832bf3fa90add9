"""HTTP/3 over QUIC (API.md §2), the only aioquic importer.

aiohttp has no HTTP/3 server, so this is a front end: each HTTP/3 request stream is relayed, body
streaming both ways, to the node's own aiohttp application over a private unix socket. The very same
handlers and middlewares (auth, errors, metrics, request ids) serve it; there is no second
implementation of the API. The relay tells the app the client's address and that the request came
over TLS with headers that the app trusts only on that private socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer, serve
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, H3Event, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ProtocolNegotiated, QuicEvent, StreamReset
from yarl import URL

from callfs.api.relay import HOP_BY_HOP as _HOP_BY_HOP
from callfs.api.state import BRIDGE_CLIENT_HEADER

log = logging.getLogger(__name__)

#: Pause relaying a download while this much is queued for one QUIC stream (aioquic has no public
#: send-buffer API; see ``_send_buffered``).
_SEND_HIGH_WATER = 1 << 20
_CHUNK = 64 * 1024


_MALFORMED = b'{"code":"BAD_REQUEST","message":"malformed request"}'
_NOT_VISIBLE = re.compile("[^\x21-\x7e]+")


def request_target(path: str) -> str | None:
    """The HTTP/1.1 request target for an HTTP/3 ``:path``, or None to refuse it (400). It is
    passed on as written (the node canonicalises it, §6.1), except that what an HTTP/1.1 request
    line cannot carry (space, TAB, other controls, DEL, non-ASCII) is percent-encoded as UTF-8,
    as a client would have sent it: ``a b`` and ``a%20b`` are one path, and a TAB (legal in a
    name) is no longer dropped by the URL library (``a<TAB>b`` acted on ``/ab``). A target not
    starting with ``/`` (it merged into the authority) is refused."""
    if not path.startswith("/"):
        return None
    return _NOT_VISIBLE.sub(lambda m: urllib.parse.quote(m.group(), safe=""), path)


class _Stream:
    def __init__(self) -> None:
        # Unbounded: aioquic grows its receive window by itself, so QUIC gives no upload
        # backpressure here; the upload size cap still applies in the app (413).
        self.body: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None


class H3Bridge(QuicConnectionProtocol):
    """One QUIC connection: HTTP/3 request streams relayed to the local aiohttp app."""

    session: aiohttp.ClientSession  # set by Http3Server before serving

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._http: H3Connection | None = None
        self._streams: dict[int, _Stream] = {}

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, ProtocolNegotiated):
            self._http = H3Connection(self._quic)
        elif isinstance(event, StreamReset):
            stream = self._streams.pop(event.stream_id, None)
            if stream is not None and stream.task is not None:
                stream.task.cancel()
        if self._http is not None:
            for h3_event in self._http.handle_event(event):
                self._h3_event(h3_event)

    def _h3_event(self, event: H3Event) -> None:
        if isinstance(event, HeadersReceived):
            stream = _Stream()
            self._streams[event.stream_id] = stream
            stream.task = asyncio.create_task(self._relay(event.stream_id, event.headers, stream))
            if event.stream_ended:
                stream.body.put_nowait(None)
        elif isinstance(event, DataReceived):
            found = self._streams.get(event.stream_id)
            if found is None:
                return
            if event.data:
                found.body.put_nowait(event.data)
            if event.stream_ended:
                found.body.put_nowait(None)

    def _peer(self) -> str:
        try:
            return str(self._quic._network_paths[0].addr[0])
        except (AttributeError, IndexError):
            return ""

    def _refuse(self, stream_id: int) -> None:
        """400 in the §8 envelope for a request the bridge cannot pass on as HTTP/1.1."""
        assert self._http is not None
        self._http.send_headers(
            stream_id,
            [
                (b":status", b"400"),
                (b"content-type", b"application/json"),
                (b"content-length", str(len(_MALFORMED)).encode()),
            ],
        )
        self._http.send_data(stream_id, _MALFORMED, end_stream=True)
        self.transmit()

    async def _relay(self, stream_id: int, raw: list[tuple[bytes, bytes]], stream: _Stream) -> None:
        assert self._http is not None
        method, path, authority = "GET", "", ""
        headers: dict[str, str] = {}
        try:
            for name_b, value_b in raw:
                name, value = name_b.decode(), value_b.decode()
                if name == ":method":
                    method = value
                elif name == ":path":
                    path = value
                elif name == ":authority":
                    authority = value
                elif not name.startswith(":") and name not in _HOP_BY_HOP:
                    headers[name] = value
        except UnicodeDecodeError:
            path = ""
        target = request_target(path)
        if target is None:
            self._streams.pop(stream_id, None)
            self._refuse(stream_id)
            return
        headers["Host"] = authority
        headers[BRIDGE_CLIENT_HEADER] = self._peer()

        async def body() -> AsyncIterator[bytes]:
            while (chunk := await stream.body.get()) is not None:
                yield chunk

        has_body = method in ("POST", "PUT", "PATCH")
        try:
            async with self.session.request(
                method,
                URL("http://callfs-h3" + target, encoded=True),  # as written: api/proxy.py
                headers=headers,
                data=body() if has_body else None,
                allow_redirects=False,
            ) as resp:
                out = [(b":status", str(resp.status).encode())]
                for name, value in resp.headers.items():
                    if method == "HEAD" and name.lower() == "content-length":
                        continue  # aioquic's H3 peers check it against the (absent) DATA frames
                    if name.lower() not in _HOP_BY_HOP:
                        out.append((name.lower().encode(), value.encode()))
                self._http.send_headers(stream_id, out, end_stream=method == "HEAD")
                self.transmit()
                if method != "HEAD":
                    async for chunk in resp.content.iter_chunked(_CHUNK):
                        await self._send_buffered(stream_id, chunk)
                    self._http.send_data(stream_id, b"", end_stream=True)
                    self.transmit()
        except asyncio.CancelledError:
            raise
        except (aiohttp.ClientError, OSError, ValueError):
            log.warning("HTTP/3 relay failed", exc_info=True)
            with contextlib.suppress(Exception):
                self._quic.reset_stream(stream_id, error_code=0x0102)  # H3_INTERNAL_ERROR
                self.transmit()
        finally:
            self._streams.pop(stream_id, None)

    async def _send_buffered(self, stream_id: int, data: bytes) -> None:
        """send_data with backpressure: wait while the stream's send buffer is over the mark."""
        assert self._http is not None
        self._http.send_data(stream_id, data, end_stream=False)
        self.transmit()
        while self._pending(stream_id) > _SEND_HIGH_WATER:
            await asyncio.sleep(0.002)
            self.transmit()

    def _pending(self, stream_id: int) -> int:
        try:
            sender = self._quic._streams[stream_id].sender
            return len(sender._buffer)
        except (AttributeError, KeyError):
            return 0


class Http3Server:
    """The QUIC listener of a node. ``start`` binds UDP; ``stop`` closes it and the relay client."""

    def __init__(self, host: str, port: int, cert_file: str, key_file: str, socket_path: str):
        self.host = host
        self.port = port
        self._cert = cert_file
        self._key = key_file
        self._socket_path = socket_path
        self._server: QuicServer | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        config = QuicConfiguration(
            is_client=False,
            alpn_protocols=H3_ALPN,
            max_stream_data=4 * 1024 * 1024,
            max_data=16 * 1024 * 1024,
        )
        config.load_cert_chain(self._cert, self._key)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=self._socket_path, limit=0),
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_read=None),
        )
        session = self._session

        def make_protocol(*args: Any, **kwargs: Any) -> H3Bridge:
            proto = H3Bridge(*args, **kwargs)
            proto.session = session
            return proto

        self._server = await serve(
            self.host, self.port, configuration=config, create_protocol=make_protocol
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._session is not None:
            await self._session.close()
            self._session = None
