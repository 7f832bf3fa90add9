"""HTTPS, wss:// and HTTP/3 on real listeners (issue 6), with a generated self-signed CA."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, H3Event, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import QuicEvent

from callfs.daemon import Node
from callfs.errors import ConfigError
from callfs.tests.functional.conftest import ALICE_KEY, make_config
from callfs.tls import generate_self_signed, server_context

H = {"Authorization": f"Bearer {ALICE_KEY}"}
MiB = 1 << 20


def free_tcp_udp_port() -> int:
    while True:
        with socket.socket() as t:
            t.bind(("127.0.0.1", 0))
            port = int(t.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port


@pytest.fixture
def certs(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "tls" / "server.crt", tmp_path / "tls" / "server.key"
    generate_self_signed(["localhost", "127.0.0.1"], cert, key)
    return cert, key


@pytest.fixture
async def tls_node(tmp_path: Path, certs: tuple[Path, Path]) -> AsyncIterator[tuple[Node, int]]:
    cert, key = certs
    port = free_tcp_udp_port()
    cfg = make_config(
        tmp_path,
        CALLFS_SERVER__PROTOCOL="https",
        CALLFS_SERVER__CERT_FILE=str(cert),
        CALLFS_SERVER__KEY_FILE=str(key),
        CALLFS_SERVER__LISTEN_ADDR=f"127.0.0.1:{port}",
        CALLFS_SERVER__ENABLE_QUIC="true",
        CALLFS_SERVER__QUIC_LISTEN_ADDR=f"127.0.0.1:{port}",
        CALLFS_SERVER__EXTERNAL_URL=f"https://127.0.0.1:{port}",
    )
    node = Node(cfg)
    await node.start()
    try:
        yield node, port
    finally:
        await node.stop()


def client_ssl(cert: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cert))


async def test_https_hsts_alt_svc_and_wss(
    tls_node: tuple[Node, int], certs: tuple[Path, Path]
) -> None:
    _, port = tls_node
    base = f"https://127.0.0.1:{port}"
    connector = aiohttp.TCPConnector(ssl=client_ssl(certs[0]))
    async with aiohttp.ClientSession(connector=connector) as s:
        async with s.get(f"{base}/health") as r:
            assert r.status == 200
            assert r.headers["Strict-Transport-Security"] == (
                "max-age=31536000; includeSubDomains; preload"
            )
            assert r.headers["Alt-Svc"] == f'h3=":{port}"; ma=3600'
        blob = os.urandom(3 * MiB)
        async with s.put(f"{base}/v1/files/tls/blob.bin", data=io.BytesIO(blob), headers=H) as r:
            assert r.status == 201
        async with s.get(f"{base}/v1/files/tls/blob.bin", headers=H) as r:
            assert await r.read() == blob
        ws = await s.ws_connect(
            f"wss://127.0.0.1:{port}/v1/files/ws/tls/ws.bin?mode=upload", headers=H
        )
        await ws.send_bytes(b"over wss")
        await ws.send_str("EOF")
        msgs = [m async for m in ws]
        assert [m.data for m in msgs] == ["ok:8"]
        # a download over wss: frames go through TLS, never straight to the socket
        ws = await s.ws_connect(f"wss://127.0.0.1:{port}/v1/files/ws/tls/blob.bin", headers=H)
        got = b"".join([m.data async for m in ws])
        assert got == blob and ws.close_code == 1000
    # an untrusted client is refused
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await s.get(f"{base}/health")


async def test_bad_tls_files_fail_start_with_the_key_named(tmp_path: Path) -> None:
    async def refused(match: str, **env: str) -> None:
        node = Node(make_config(tmp_path, **env))
        with pytest.raises(ConfigError, match=match):
            await node.start()
        await node.stop()

    await refused(
        r"server\.cert_file",
        CALLFS_SERVER__PROTOCOL="https",
        CALLFS_SERVER__CERT_FILE=str(tmp_path / "missing.crt"),
        CALLFS_SERVER__KEY_FILE=str(tmp_path / "missing.key"),
    )
    other = tmp_path / "other"
    generate_self_signed(["a"], other / "a.crt", other / "a.key")
    generate_self_signed(["b"], other / "b.crt", other / "b.key")
    mismatched = {
        "CALLFS_SERVER__CERT_FILE": str(other / "a.crt"),
        "CALLFS_SERVER__KEY_FILE": str(other / "b.key"),
    }
    no_match = r"do not match|could not be loaded"
    await refused(no_match, CALLFS_SERVER__PROTOCOL="https", **mismatched)
    # HTTP/3 over a plain-HTTP listener: its TLS files get the same checks (aioquic loaded
    # them, the server ran, and every handshake failed)
    await refused(
        no_match,
        CALLFS_SERVER__PROTOCOL="http",
        CALLFS_SERVER__ENABLE_QUIC="true",
        CALLFS_SERVER__QUIC_LISTEN_ADDR=f"127.0.0.1:{free_tcp_udp_port()}",
        **mismatched,
    )


def test_an_encrypted_key_is_refused_without_a_prompt(tmp_path: Path) -> None:
    """OpenSSL asked for the passphrase on the terminal, and start-up waited for it."""
    from cryptography.hazmat.primitives import serialization

    generate_self_signed(["a"], tmp_path / "a.crt", tmp_path / "a.key")
    key = serialization.load_pem_private_key((tmp_path / "a.key").read_bytes(), None)
    locked = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    (tmp_path / "locked.key").write_bytes(locked)
    with pytest.raises(ConfigError, match=r"server\.key_file is encrypted"):
        server_context(str(tmp_path / "a.crt"), str(tmp_path / "locked.key"))
    server_context(str(tmp_path / "a.crt"), str(tmp_path / "a.key"))  # the plain one loads


class H3Client(QuicConnectionProtocol):
    """A minimal HTTP/3 client over aioquic for the tests."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.http = H3Connection(self._quic)
        self._pending: dict[int, dict[str, Any]] = {}

    def quic_event_received(self, event: QuicEvent) -> None:
        for ev in self.http.handle_event(event):
            self._h3(ev)

    def _h3(self, ev: H3Event) -> None:
        if not isinstance(ev, HeadersReceived | DataReceived):
            return
        state = self._pending.get(ev.stream_id)
        if state is None:
            return
        if isinstance(ev, HeadersReceived):
            state["headers"] = {k.decode(): v.decode() for k, v in ev.headers}
        else:
            state["body"].extend(ev.data)
        if ev.stream_ended and not state["done"].done():
            state["done"].set_result(None)

    async def request(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        body: list[bytes] | None = None,
        timeout: float = 60.0,
    ) -> tuple[int, dict[str, str], bytes]:
        sid = self._quic.get_next_available_stream_id()
        done = asyncio.get_running_loop().create_future()
        self._pending[sid] = {"headers": {}, "body": bytearray(), "done": done}
        hdrs = [
            (b":method", method.encode()),
            (b":scheme", b"https"),
            (b":authority", b"127.0.0.1"),
            (b":path", path.encode()),
        ] + [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        self.http.send_headers(sid, hdrs, end_stream=body is None)
        self.transmit()
        for chunk in body or []:
            self.http.send_data(sid, chunk, end_stream=False)
            self.transmit()
            await asyncio.sleep(0)
        if body is not None:
            self.http.send_data(sid, b"", end_stream=True)
            self.transmit()
        await asyncio.wait_for(done, timeout)
        state = self._pending.pop(sid)
        return int(state["headers"][":status"]), state["headers"], bytes(state["body"])


async def test_http3_same_routes(tls_node: tuple[Node, int], certs: tuple[Path, Path]) -> None:
    _, port = tls_node
    config = QuicConfiguration(
        is_client=True, alpn_protocols=H3_ALPN, max_data=256 * MiB, max_stream_data=128 * MiB
    )
    config.load_verify_locations(str(certs[0]))
    async with connect("127.0.0.1", port, configuration=config, create_protocol=H3Client) as c:
        client: H3Client = c  # type: ignore[assignment]
        status, headers, body = await client.request("GET", "/health", {})
        assert (status, body) == (200, b'{"status":"ok"}')
        assert headers["strict-transport-security"].startswith("max-age=")
        assert "alt-svc" not in headers
        status, _, body = await client.request("GET", "/v1/files/x", {})
        assert status == 401
        assert body == b'{"code":"AUTHENTICATION_FAILED","message":"authentication failed"}'
        parts = [os.urandom(256 * 1024) for _ in range(16)]
        status, _, _ = await client.request("POST", "/v1/files/h3/up.bin", H, body=parts)
        assert status == 201
        status, headers, _ = await client.request("HEAD", "/v1/files/h3/up.bin", H)
        assert status == 200 and headers["x-callfs-size"] == str(4 * MiB)
        big = os.urandom(64 * MiB)
        # 64 MiB put over HTTP/1.1 on disk directly is not the point; upload it over h3 too
        status, _, _ = await client.request(
            "PUT",
            "/v1/files/h3/big.bin",
            H,
            body=[big[i : i + MiB] for i in range(0, len(big), MiB)],
        )
        assert status == 201
        status, headers, _ = await client.request("HEAD", "/v1/files/h3/big.bin", H)
        assert status == 200 and headers["x-callfs-size"] == str(len(big))
        status, headers, body = await client.request("GET", "/v1/files/h3/big.bin", H)
        assert status == 200
        assert hashlib.sha256(body).digest() == hashlib.sha256(big).digest()
        status, _, body = await client.request(
            "GET", "/v1/files/h3/up.bin", {**H, "Range": "bytes=0-9"}
        )
        assert status == 206 and body == parts[0][:10]
        # a :path as written: what an HTTP/1.1 request line cannot carry is percent-encoded
        # (a TAB, legal in names, was dropped: a<TAB>b acted on /ab), and no leading / is 400
        for raw, escaped in (
            ("/v1/files/h3/é e.txt", "%C3%A9%20e.txt"),
            ("/v1/files/h3/a\tb", "a%09b"),
        ):
            status, _, _ = await client.request("PUT", raw, H, body=[b"named"])
            assert status == 201, raw
            status, headers, _ = await client.request("HEAD", "/v1/files/h3/" + escaped, H)
            assert status == 200 and headers["x-callfs-size"] == "5", raw
        assert (await client.request("HEAD", "/v1/files/h3/ab", H))[0] == 404
        status, _, body = await client.request("GET", ".x/v1/files/h3/up.bin", H)
        assert (status, body) == (400, b'{"code":"BAD_REQUEST","message":"malformed request"}')
