"""Limits against slow and stalled clients (API.md §2, §22 "Limits"; docs/security.md "Limits").

These run a real listening node (``Node.start``) on a free port, because the header wait and
the connection caps live in the listener, not in the application the test client wraps.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient

from callfs.daemon import Node
from callfs.errors import ConfigError
from callfs.tests.functional.conftest import ALICE_KEY, auth, make_config

Client = TestClient[Any, Any]
MiB = 1 << 20
#: A second loopback source address: the "fresh client" of the per-IP tests (Linux routes all
#: of 127.0.0.0/8 on lo).
OTHER_IP = "127.0.0.2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def live_node(tmp_path: Path, **env: str) -> AsyncIterator[tuple[Node, int]]:
    port = free_port()
    node = Node(make_config(tmp_path, CALLFS_SERVER__LISTEN_ADDR=f"127.0.0.1:{port}", **env))
    await node.start()
    try:
        yield node, port
    finally:
        await node.stop()


async def connect(port: int, source: str = "127.0.0.1") -> tuple[asyncio.StreamReader, Any]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """True when the server closes the connection (EOF or reset) within ``seconds``; whatever it
    sends first (a response, an error) is read and dropped."""
    try:
        async with asyncio.timeout(seconds):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        pass
    return True


async def trickle(writer: Any, data: bytes, gap: float) -> None:
    """Send ``data`` one byte every ``gap`` seconds until it is sent or the peer is gone."""
    with contextlib.suppress(ConnectionError):
        for i in range(len(data)):
            writer.write(data[i : i + 1])
            await writer.drain()
            await asyncio.sleep(gap)


async def health_from(port: int, source: str) -> int:
    connector = aiohttp.TCPConnector(local_addr=(source, 0), force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(
            f"http://127.0.0.1:{port}/health", timeout=aiohttp.ClientTimeout(total=3)
        ) as resp,
    ):
        return resp.status


def close_all(writers: list[Any]) -> None:
    for w in writers:
        w.close()


async def big_body(size: int) -> AsyncIterator[bytes]:
    chunk = os.urandom(MiB)
    for _ in range(size // MiB):
        yield chunk


def node_server(node: Node) -> web.Server:
    """The low-level server of the node's main listener."""
    server = node._runners[0].server
    assert server is not None
    return server


def sample(node: Node, name: str, **labels: str) -> float:
    value = node.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


# ---- header wait ---------------------------------------------------------------------------------
async def test_header_wait_bounded_by_read_timeout(tmp_path: Path) -> None:
    """Silent and trickling connections close after read_timeout; an idle keep-alive one does not
    (it has 120 s); a keep-alive one whose next request trickles in closes again."""
    async with live_node(tmp_path, CALLFS_SERVER__READ_TIMEOUT="1s") as (node, port):
        silent_r, silent_w = await connect(port)
        trick_r, trick_w = await connect(port)
        ka_r, ka_w = await connect(port)
        writers = [silent_w, trick_w, ka_w]
        try:
            started = time.monotonic()
            feeder = asyncio.create_task(
                trickle(trick_w, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: aaaaaaaaaaaa", 0.2)
            )
            ka_w.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            status = await ka_r.readuntil(b'{"status":"ok"}')
            assert status.startswith(b"HTTP/1.1 200")
            assert await closed_within(silent_r, 4.0)
            assert await closed_within(trick_r, 4.0)
            assert time.monotonic() - started < 4.0
            await feeder
            # idle keep-alive: still usable well after read_timeout
            assert not await closed_within(ka_r, 0.5)
            ka_w.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            again = await asyncio.wait_for(ka_r.readuntil(b'{"status":"ok"}'), 2.0)
            assert again.startswith(b"HTTP/1.1 200")
            # its next request trickles: the header wait applies again
            ka_w.write(b"GET /hea")
            assert await closed_within(ka_r, 3.0)
            assert sample(node, "callfs_connections_timed_out_total", reason="header_wait") >= 3
        finally:
            close_all(writers)


# ---- connection caps -----------------------------------------------------------------------------
async def test_slowloris_per_ip_cap_and_health_from_a_fresh_client(tmp_path: Path) -> None:
    env = {
        "CALLFS_SERVER__READ_TIMEOUT": "2s",
        "CALLFS_SERVER__MAX_CONNECTIONS_PER_IP": "20",
    }
    async with live_node(tmp_path, **env) as (node, port):
        writers: list[Any] = []
        try:
            started = time.monotonic()
            conns = [await connect(port) for _ in range(50)]
            writers = [w for _, w in conns]
            feeders = [
                asyncio.create_task(trickle(w, b"GET / HTTP/1.1\r\nHost: x\r\n", 0.25))
                for w in writers
            ]
            quick = await asyncio.gather(*(closed_within(r, 0.5) for r, _ in conns))
            assert sum(quick) == 30, quick  # over the quota: closed at once
            assert not any(quick[:20])  # the first 20 were admitted
            # the quota is per IP: another client is served meanwhile
            assert await health_from(port, OTHER_IP) == 200
            rejected = sample(
                node, "callfs_connections_rejected_total", reason="max_connections_per_ip"
            )
            assert rejected == 30
            # the admitted trickling ones are closed after read_timeout, well before 120 s
            slow = await asyncio.gather(*(closed_within(r, 5.0) for r, _ in conns[:20]))
            assert all(slow)
            assert time.monotonic() - started < 7.0
            for f in feeders:
                await f
            # the quota is free again
            assert await health_from(port, "127.0.0.1") == 200
        finally:
            close_all(writers)


@pytest.mark.parametrize("name", ["max_connections", "max_connections_per_ip"])
def test_caps_must_be_positive(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match=f"server.{name} must be > 0"):
        make_config(tmp_path, **{f"CALLFS_SERVER__{name.upper()}": "0"})


async def test_total_connection_cap(tmp_path: Path) -> None:
    env = {"CALLFS_SERVER__MAX_CONNECTIONS": "5", "CALLFS_SERVER__READ_TIMEOUT": "3s"}
    async with live_node(tmp_path, **env) as (node, port):
        conns = [await connect(port) for _ in range(5)]
        writers = [w for _, w in conns]
        try:
            for _, w in conns:
                w.write(b"G")
            assert not any(await asyncio.gather(*(closed_within(r, 0.3) for r, _ in conns)))
            extra_r, extra_w = await connect(port, OTHER_IP)
            writers.append(extra_w)
            assert await closed_within(extra_r, 0.5)
            assert sample(node, "callfs_connections_rejected_total", reason="max_connections") == 1
        finally:
            close_all(writers)


# ---- stalled readers -----------------------------------------------------------------------------
async def put_big(port: int, name: str, size: int) -> None:
    """Store ``size`` bytes at ``/<name>`` through the node's HTTP listener."""
    async with (
        aiohttp.ClientSession() as session,
        session.put(
            f"http://127.0.0.1:{port}/v1/files/{name}", data=big_body(size), headers=auth()
        ) as r,
    ):
        assert r.status == 201


def get_request(name: str, close: bool = False) -> str:
    """A raw GET of ``/<name>`` as alice."""
    last = "Connection: close\r\n" if close else ""
    return (
        f"GET /v1/files/{name} HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {ALICE_KEY}\r\n{last}\r\n"
    )


async def tiny_window_socket(port: int, request: str) -> socket.socket:
    """A non-blocking client socket with a 4 KiB receive buffer that has sent ``request``: what
    the server can push ahead of the reader is small."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, request.encode())
    except BaseException:
        sock.close()
        raise
    return sock


async def stalled_download(
    port: int, request: str, stall: float, server: web.Server | None = None
) -> int:
    """Send ``request`` from a socket with a tiny receive buffer, read nothing for ``stall``
    seconds, then read fast to the end: how many bytes arrived before the server hung up.
    Its connection to ``server`` must be gone before the client reads (the fd is released)."""
    loop = asyncio.get_running_loop()
    received = 0
    earlier = set() if server is None else set(server.connections)
    sock = await tiny_window_socket(port, request)
    try:
        await asyncio.sleep(stall)
        if server is not None:
            assert set(server.connections) <= earlier
        async with asyncio.timeout(5):
            while True:
                try:
                    data = await loop.sock_recv(sock, 1 << 20)
                except ConnectionError:
                    break
                if not data:
                    break
                received += len(data)
    finally:
        sock.close()
    return received


@pytest.mark.parametrize("path", ["sendfile", "write"])
async def test_download_to_a_stalled_reader_is_cut_off(
    tmp_path: Path, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if path == "write":  # the path of TLS, S3 and uvloop: chunks through aiohttp's writer
        monkeypatch.setattr("callfs.api.files._SENDFILE_MIN", 1 << 62)
    size = 64 * MiB
    async with live_node(tmp_path, CALLFS_SERVER__WRITE_TIMEOUT="1s") as (node, port):
        await put_big(port, "big.bin", size)
        received = await stalled_download(port, get_request("big.bin"), 3.5, node_server(node))
        # the server gave up: only what sat in the socket buffers arrived
        assert received < size // 2
        assert sample(node, "callfs_connections_timed_out_total", reason="write_stall") == 1


@pytest.mark.parametrize("path", ["sendfile", "write"])
async def test_a_reader_that_resets_mid_download_is_no_stall_and_the_node_serves_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """The first sendfile call (or the first writes) fill the socket buffer; the reader then
    resets the connection while the rest waits: that is a client gone away, not a write stall
    nor a failure to log, and the next download is served whole."""
    if path == "write":  # the path of TLS, S3 and uvloop: chunks through aiohttp's writer
        monkeypatch.setattr("callfs.api.files._SENDFILE_MIN", 1 << 62)
    size = 64 * MiB
    caplog.set_level(logging.WARNING)  # whatever an earlier test left the root logger at
    async with live_node(tmp_path, CALLFS_SERVER__WRITE_TIMEOUT="5s") as (node, port):
        await put_big(port, "big.bin", size)
        sock = await tiny_window_socket(port, get_request("big.bin"))
        loop = asyncio.get_running_loop()
        assert await loop.sock_recv(sock, 4096)
        await asyncio.sleep(0.3)  # the server is now waiting for the socket to drain
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # RST
        await asyncio.sleep(0.5)
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/v1/files/big.bin", headers=auth()) as r,
        ):
            got = 0
            async for chunk in r.content.iter_any():
                got += len(chunk)
        assert r.status == 200 and got == size
        assert sample(node, "callfs_connections_timed_out_total", reason="write_stall") == 0
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


@pytest.mark.parametrize("after", [0, MiB])
async def test_a_disk_error_during_sendfile_cuts_the_download_short_and_quietly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, after: int
) -> None:
    """EIO from sendfile once the status line is out, at the first call (the handler's own) or
    after ``after`` bytes went out (asyncio's calls): the client gets a short body (never a
    second response inside the first), the node logs one warning, no error with a traceback and
    no write stall, and serves the next download whole."""
    size = 64 * MiB
    real = os.sendfile
    failing = {"on": False}

    def sendfile(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        if not failing["on"]:
            return real(out_fd, in_fd, offset, count)
        if offset is not None and offset < after:  # this part of the file still reads
            return real(out_fd, in_fd, offset, min(count, after - offset))
        raise OSError(errno.EIO, "Input/output error")

    caplog.set_level(logging.WARNING)
    async with live_node(tmp_path) as (node, port):
        await put_big(port, "big.bin", size)
        monkeypatch.setattr(os, "sendfile", sendfile)
        failing["on"] = True
        url = f"http://127.0.0.1:{port}/v1/files/big.bin"
        got = 0
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ClientPayloadError):
                async with session.get(url, headers=auth()) as r:
                    assert r.status == 200
                    async for chunk in r.content.iter_any():
                        got += len(chunk)
            assert after <= got < size
            failing["on"] = False
            async with session.get(url, headers=auth()) as r:
                assert r.status == 200 and len(await r.read()) == size
        assert sample(node, "callfs_connections_timed_out_total", reason="write_stall") == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert "failed mid-stream" in caplog.text


async def read_slowly(
    port: int, name: str, step: int, pause: float, request: str = "", enough: int = 1 << 62
) -> int:
    """GET ``/<name>`` (or send ``request``) from a tiny-window socket at ``step`` bytes per
    ``pause`` seconds, to the end, until the server hangs up or ``enough`` bytes came: the bytes
    received, headers included."""
    loop = asyncio.get_running_loop()
    received = 0
    sock = await tiny_window_socket(port, request or get_request(name, close=True))
    try:
        async with asyncio.timeout(60):
            while received < enough:
                data = await loop.sock_recv(sock, step)
                if not data:
                    break
                received += len(data)
                await asyncio.sleep(pause * len(data) / step)
    finally:
        sock.close()
    return received


async def test_a_slow_reader_that_keeps_reading_is_never_cut_off(tmp_path: Path) -> None:
    """``server.write_timeout`` bounds a stall, not a slow transfer (§2): a reader taking 32 KiB
    every 0.2 s gets the whole sendfile download with a 0.5 s timeout. On Linux the kernel
    watches the progress (TCP_USER_TIMEOUT, one sendfile for the whole range): it must count
    every acknowledged byte as progress and never cut such a reader."""
    size = MiB
    async with live_node(tmp_path, CALLFS_SERVER__WRITE_TIMEOUT="500ms") as (node, port):
        await put_big(port, "slow.bin", size)
        received = await read_slowly(port, "slow.bin", 32 * 1024, 0.2)
        assert received > size  # the headers and every byte of the body
        assert sample(node, "callfs_connections_timed_out_total", reason="write_stall") == 0


async def test_a_slow_websocket_reader_that_keeps_reading_is_never_cut_off(
    tmp_path: Path,
) -> None:
    """A chunk's frames (1 MiB) are queued at once; the reader takes 64 KiB every 0.2 s with a
    0.5 s write_timeout. The bytes leaving the queue are its progress: it gets every frame."""
    size = MiB
    request = (
        "GET /v1/files/ws/slow.bin HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        f"Authorization: Bearer {ALICE_KEY}\r\n\r\n"
    )
    async with live_node(tmp_path, CALLFS_SERVER__WRITE_TIMEOUT="500ms") as (node, port):
        await put_big(port, "slow.bin", size)
        # the 101's headers, sixteen 64 KiB frames with 10-byte headers, then the close frame
        received = await read_slowly(port, "", 64 * 1024, 0.2, request, size + 16 * 10 + 200)
        assert received > size + 16 * 10
        assert sample(node, "callfs_connections_timed_out_total", reason="write_stall") == 0


async def test_a_slow_reader_of_big_streamed_chunks_is_never_cut_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The streamed path (TLS, S3, uvloop) with 4 MiB chunks, as S3 reads come: a reader taking
    about 1 MB/s with a 2 s write_timeout gets every byte. Each chunk goes out in slices with
    a timer of their own; a whole 4 MiB chunk would need about 4 s. (The timeout leaves room for
    the kernel's send buffer: the socket turns writable again only once a good part of what it
    queued has drained.)"""
    monkeypatch.setattr("callfs.api.files._SENDFILE_MIN", 1 << 62)
    monkeypatch.setattr("callfs.storage.localfs.READ_CHUNK", 4 * MiB)
    size = 6 * MiB
    async with live_node(tmp_path, CALLFS_SERVER__WRITE_TIMEOUT="2s") as (node, port):
        await put_big(port, "slow.bin", size)
        received = await read_slowly(port, "slow.bin", 64 * 1024, 0.05)
        assert received > size
        assert sample(node, "callfs_connections_timed_out_total", reason="write_stall") == 0


async def test_remote_owned_download_to_a_stalled_reader_is_cut_off(tmp_path: Path) -> None:
    """Node b streams a file that node a owns (one shared metadata store) to a client that
    stalls: b's chunked write path gives up too."""
    size = 64 * MiB
    port_a, port_b = free_port(), free_port()
    shared = {
        "CALLFS_SERVER__WRITE_TIMEOUT": "1s",
        "CALLFS_METADATA_STORE__SQLITE_PATH": str(tmp_path / "shared.sqlite3"),
        "CALLFS_INSTANCE_DISCOVERY__PEER_ENDPOINTS__A": f"http://127.0.0.1:{port_a}",
        "CALLFS_INSTANCE_DISCOVERY__PEER_ENDPOINTS__B": f"http://127.0.0.1:{port_b}",
    }
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    node_a = Node(
        make_config(
            tmp_path / "a",
            CALLFS_SERVER__LISTEN_ADDR=f"127.0.0.1:{port_a}",
            CALLFS_SERVER__EXTERNAL_URL=f"http://127.0.0.1:{port_a}",
            CALLFS_INSTANCE_DISCOVERY__INSTANCE_ID="a",
            **shared,
        )
    )
    node_b = Node(
        make_config(
            tmp_path / "b",
            CALLFS_SERVER__LISTEN_ADDR=f"127.0.0.1:{port_b}",
            CALLFS_SERVER__EXTERNAL_URL=f"http://127.0.0.1:{port_b}",
            CALLFS_INSTANCE_DISCOVERY__INSTANCE_ID="b",
            **shared,
        )
    )
    await node_a.start()
    try:
        await node_b.start()
        try:
            await put_big(port_a, "big.bin", size)
            received = await stalled_download(
                port_b, get_request("big.bin"), 3.5, node_server(node_b)
            )
            assert received < size // 2
            assert sample(node_b, "callfs_connections_timed_out_total", reason="write_stall") == 1
        finally:
            await node_b.stop()
    finally:
        await node_a.stop()


# ---- WebSocket -----------------------------------------------------------------------------------
@pytest.fixture
def config_env() -> dict[str, str]:
    return {"CALLFS_SERVER__READ_TIMEOUT": "1s", "CALLFS_SERVER__WRITE_TIMEOUT": "1s"}


async def test_idle_websocket_upload_is_closed(client: Client, node: Node) -> None:
    ws = await client.ws_connect("/v1/files/ws/idle.bin?mode=upload", headers=auth())
    await ws.send_bytes(b"x" * 1000)
    started = time.monotonic()
    msg = await ws.receive(timeout=4)
    assert msg.type == WSMsgType.CLOSE
    assert msg.data == 1008
    assert msg.extra == "idle timeout"
    assert time.monotonic() - started < 3.0
    await ws.close()
    resp = await client.get("/v1/files/idle.bin", headers=auth())
    assert resp.status == 404
    assert sample(node, "callfs_connections_timed_out_total", reason="websocket_idle") == 1


async def test_websocket_download_to_a_stalled_reader_is_cut_off(
    client: Client, node: Node
) -> None:
    size = 32 * MiB
    resp = await client.put("/v1/files/wsbig.bin", data=big_body(size), headers=auth())
    assert resp.status == 201
    assert client.port is not None
    request = (
        "GET /v1/files/ws/wsbig.bin HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        f"Authorization: Bearer {ALICE_KEY}\r\n\r\n"
    )
    runner = client.server.runner
    assert runner is not None
    received = await stalled_download(client.port, request, 3.5, runner.server)
    assert received < size // 2
    assert sample(node, "callfs_connections_timed_out_total", reason="write_stall") == 1


def _masked(opcode: int, payload: bytes) -> bytes:
    """One client frame (FIN set, masked, payload under 126 bytes)."""
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + body


async def test_a_websocket_upload_half_closed_after_eof_gets_its_acknowledgement(
    tmp_path: Path,
) -> None:
    """§9.9: after ``EOF`` the ``ok:<bytes>`` acknowledgement is always delivered. A client that
    sent its frames and EOF, then half-closed (FIN, still reading), got the connection closed
    at once: no acknowledgement, while the upload still committed a moment later (found by
    audit). A half-close before EOF still stores nothing."""
    request = (
        "GET /v1/files/ws/{name}?mode=upload HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        f"Authorization: Bearer {ALICE_KEY}\r\n\r\n"
    )

    async def send_then_half_close(port: int, name: str, frames: bytes) -> bytes:
        reader, writer = await connect(port)
        writer.write(request.format(name=name).encode())
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        writer.write(frames)
        await writer.drain()
        writer.write_eof()  # FIN: done sending, still reading
        async with asyncio.timeout(5):
            answer = await reader.read()  # to the server's close
        writer.close()
        return answer

    async with live_node(tmp_path) as (node, port):
        answer = await send_then_half_close(
            port, "acked.bin", _masked(0x2, b"abc") + _masked(0x1, b"EOF")
        )
        assert b"ok:3" in answer and b"upload complete" in answer, answer
        assert node.meta is not None
        entry = await node.meta.get("/acked.bin")
        assert entry is not None and entry.size == 3  # committed before the answer
        await send_then_half_close(port, "dropped.bin", _masked(0x2, b"abc"))
        assert await node.meta.get("/dropped.bin") is None


async def test_a_websocket_download_the_client_leaves_is_no_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that leaves mid-download is no failure of ours: it logged a WARNING with a
    traceback each time (found by audit)."""
    caplog.set_level(logging.INFO)
    request = (
        "GET /v1/files/ws/left.bin HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        f"Authorization: Bearer {ALICE_KEY}\r\n\r\n"
    )
    async with live_node(tmp_path) as (_node, port):
        await put_big(port, "left.bin", 64 * MiB)
        reader, writer = await connect(port)
        writer.write(request.encode())
        await reader.readexactly(1 << 20)  # under way
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # gone: a reset, mid-file
        await asyncio.sleep(1.0)
    failed = [r for r in caplog.records if "failed mid-way" in r.getMessage()]
    assert failed == [], [r.getMessage() for r in failed]
