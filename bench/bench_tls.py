"""Issue 6 figures: 256 MiB GET and PUT and 4 KiB GET over plain HTTP, HTTPS and HTTP/3,
in one run against two ``callfs server`` processes (plain HTTP, and HTTPS+QUIC), with the same
Python clients (aiohttp for HTTP/1.1, aioquic for HTTP/3).

    python bench/bench_tls.py
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aioquic.asyncio.client import connect
from aioquic.h3.connection import H3_ALPN
from aioquic.quic.configuration import QuicConfiguration

from callfs.tests.test_tls_http3 import H3Client
from callfs.tls import generate_self_signed

KEY = "bench-key-0123456789abcdef"
H = {"Authorization": f"Bearer {KEY}"}
BIG = 256 * 1024 * 1024
SMALL_N = 2000


def free_port() -> int:
    while True:
        with socket.socket() as t, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            t.bind(("127.0.0.1", 0))
            port = int(t.getsockname()[1])
            try:
                u.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def start(tmp: Path, port: int, tls: bool, cert: Path, key: Path) -> subprocess.Popen[bytes]:
    proto = (
        f'protocol: https, cert_file: "{cert}", key_file: "{key}", enable_quic: true,'
        f' quic_listen_addr: "127.0.0.1:{port}",'
        if tls
        else 'protocol: http, cert_file: "", key_file: "",'
    )
    cfg = tmp / f"c{port}.yaml"
    cfg.write_text(
        f"""server: {{{proto} listen_addr: "127.0.0.1:{port}"}}
metrics: {{listen_addr: ""}}
log: {{level: warn, format: console}}
auth: {{api_keys: ["{KEY}"], internal_proxy_secret: bench-internal-0123456789,
  single_use_link_secret: bench-link-0123456789}}
metadata_store: {{type: sqlite, sqlite_path: "{tmp}/m{port}.sqlite3"}}
dlm: {{type: local}}
backend: {{localfs_root_path: "{tmp}/files{port}"}}
"""
    )
    return subprocess.Popen([sys.executable, "-m", "callfs", "server", "-c", str(cfg)], cwd=tmp)


async def wait(base: str, ctx: ssl.SSLContext | None) -> None:
    for _ in range(100):
        try:
            conn = aiohttp.TCPConnector(ssl=ctx if ctx else False)
            async with aiohttp.ClientSession(connector=conn) as s, s.get(base + "/health"):
                return
        except aiohttp.ClientError:
            await asyncio.sleep(0.1)


async def http_figures(base: str, ctx: ssl.SSLContext | None, blob_path: Path) -> list[float]:
    conn = aiohttp.TCPConnector(ssl=ctx if ctx else False, limit=16)
    async with aiohttp.ClientSession(connector=conn) as s:
        t = time.perf_counter()
        with blob_path.open("rb") as f:
            async with s.put(f"{base}/v1/files/b/big.bin", data=f, headers=H) as r:
                assert r.status in (200, 201), r.status
        put = BIG / (time.perf_counter() - t) / 1e6
        t = time.perf_counter()
        async with s.get(f"{base}/v1/files/b/big.bin", headers=H) as r:
            async for _ in r.content.iter_chunked(1 << 20):
                pass
        get = BIG / (time.perf_counter() - t) / 1e6
        async with s.put(f"{base}/v1/files/b/small.bin", data=b"s" * 4096, headers=H) as r:
            assert r.status in (200, 201)
        sem = asyncio.Semaphore(16)

        async def one() -> None:
            async with sem, s.get(f"{base}/v1/files/b/small.bin", headers=H) as r:
                await r.read()

        t = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(SMALL_N)))
        small = SMALL_N / (time.perf_counter() - t)
    return [get, put, small]


async def h3_figures(port: int, cert: Path, blob_path: Path) -> list[float]:
    config = QuicConfiguration(
        is_client=True, alpn_protocols=H3_ALPN, max_data=1 << 30, max_stream_data=1 << 29
    )
    config.load_verify_locations(str(cert))
    async with connect("127.0.0.1", port, configuration=config, create_protocol=H3Client) as c:
        client: H3Client = c  # type: ignore[assignment]
        data = blob_path.read_bytes()
        t = time.perf_counter()
        status, _, _ = await client.request(
            "PUT",
            "/v1/files/b/h3.bin",
            H,
            body=[data[i : i + (1 << 20)] for i in range(0, BIG, 1 << 20)],
        )
        put = BIG / (time.perf_counter() - t) / 1e6
        t = time.perf_counter()
        status, _, body = await client.request("GET", "/v1/files/b/h3.bin", H)
        get = BIG / (time.perf_counter() - t) / 1e6
        assert status == 200 and len(body) == BIG
        del data, body
        t = time.perf_counter()
        n = SMALL_N // 4
        sem = asyncio.Semaphore(16)

        async def one() -> None:
            async with sem:
                await client.request("GET", "/v1/files/b/small.bin", H)

        await asyncio.gather(*(one() for _ in range(n)))
        small = n / (time.perf_counter() - t)
    return [get, put, small]


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        cert, key = tmp / "c.crt", tmp / "c.key"
        generate_self_signed(["127.0.0.1"], cert, key)
        blob = tmp / "big.bin"
        blob.write_bytes(os.urandom(BIG))
        plain_port, tls_port = free_port(), free_port()
        procs = [start(tmp, plain_port, False, cert, key), start(tmp, tls_port, True, cert, key)]
        try:
            ctx = ssl.create_default_context(cafile=str(cert))
            await wait(f"http://127.0.0.1:{plain_port}", None)
            await wait(f"https://127.0.0.1:{tls_port}", ctx)
            plain = await http_figures(f"http://127.0.0.1:{plain_port}", None, blob)
            tls = await http_figures(f"https://127.0.0.1:{tls_port}", ctx, blob)
            h3 = await h3_figures(tls_port, cert, blob)
        finally:
            for p in procs:
                p.terminate()
                p.wait(30)
    print("| workload | plain HTTP | HTTPS | HTTP/3 | HTTPS/plain (goal >= 0.7 large) |")
    print("|---|---:|---:|---:|---:|")
    for i, (label, unit) in enumerate(
        [("GET 256 MiB", "MB/s"), ("PUT 256 MiB", "MB/s"), ("GET 4 KiB, 16 in flight", "req/s")]
    ):
        print(
            f"| {label} | {plain[i]:,.0f} {unit} | {tls[i]:,.0f} {unit} | {h3[i]:,.0f} {unit} |"
            f" {tls[i] / plain[i]:.2f}x |"
        )


if __name__ == "__main__":
    asyncio.run(main())
