"""Issue 6 figures: 256 MiB GET and PUT and 4 KiB GET over plain HTTP, HTTPS and HTTP/3,
in one run against two ``callfs server`` processes (plain HTTP, and HTTPS+QUIC), with the same
Python clients (aiohttp for HTTP/1.1, aioquic for HTTP/3). Then issue 18's references, same run,
same 256 MiB file and certificate:

- HTTPS GET: CallFS and nginx over TLS (``nginx`` on PATH), both read by curl, best of three;
- HTTP/3 GET: CallFS and aioquic's own example server (``examples/http3_server.py`` of the
  installed aioquic version, fetched with ``pip download`` into ``$CALLFS_BENCH_CACHE``, default
  ``/tmp/bench/cache``; it needs ``wsproto``) serving the file through ``h3_ref_app.py``, both read
  by the same aioquic client, best of three.

    python bench/bench_tls.py
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import shutil
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
            timeout=900,  # an HTTP/3 upload ran at 4 MB/s here: 256 MiB takes over a minute
        )
        put = BIG / (time.perf_counter() - t) / 1e6
        t = time.perf_counter()
        status, _, body = await client.request("GET", "/v1/files/b/h3.bin", H, timeout=900)
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


HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("CALLFS_BENCH_CACHE", "/tmp/bench/cache"))


def curl_get(url: str, cert: Path, headers: dict[str, str]) -> float:
    """MB/s of one curl download (best of three)."""
    best = 0.0
    for _ in range(3):
        cmd = ["curl", "-sS", "--cacert", str(cert), "-o", "/dev/null", "-w", "%{speed_download}"]
        for k, v in headers.items():
            cmd += ["-H", f"{k}: {v}"]
        out = subprocess.run([*cmd, url], capture_output=True, text=True, check=True).stdout
        best = max(best, float(out) / 1e6)
    return best


def start_nginx_tls(
    tmp: Path, port: int, root: Path, cert: Path, key: Path
) -> subprocess.Popen[bytes]:
    """nginx as the shared harness runs it (sendfile off: TLS), over TLS, serving ``root``."""
    conf = tmp / "nginx-tls.conf"
    conf.write_text(
        f"""daemon off;
worker_processes auto;
user root;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        root {root};
    }}
}}
"""
    )
    return subprocess.Popen(["nginx", "-c", str(conf)], cwd=tmp)


def aioquic_examples() -> Path:
    """``examples/`` of the installed aioquic's source release (downloaded once)."""
    version = importlib.metadata.version("aioquic")
    target = CACHE / f"aioquic-{version}" / "examples"
    if not (target / "http3_server.py").exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--no-binary",
                ":all:",
                "-d",
                str(CACHE),
                f"aioquic=={version}",
            ],
            check=True,
        )
        shutil.unpack_archive(str(CACHE / f"aioquic-{version}.tar.gz"), str(CACHE))
    return target


def start_aioquic_example(port: int, cert: Path, key: Path, blob: Path) -> subprocess.Popen[bytes]:
    examples = aioquic_examples()
    env = {**os.environ, "REF_FILE": str(blob), "PYTHONPATH": f"{HERE}:{examples}"}
    return subprocess.Popen(
        [
            sys.executable,
            str(examples / "http3_server.py"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "-c",
            str(cert),
            "-k",
            str(key),
            "h3_ref_app:app",
        ],
        env=env,
        cwd=examples,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def h3_get(port: int, cert: Path, path: str, headers: dict[str, str]) -> float:
    """MB/s of the best of three HTTP/3 GETs of ``path`` (256 MiB) on one connection."""
    config = QuicConfiguration(
        is_client=True, alpn_protocols=H3_ALPN, max_data=1 << 30, max_stream_data=1 << 29
    )
    config.load_verify_locations(str(cert))
    best = 0.0
    for attempt in range(50):  # the server may still be starting (UDP: nothing to connect to)
        try:
            async with asyncio.timeout(60):
                async with connect(
                    "127.0.0.1", port, configuration=config, create_protocol=H3Client
                ) as c:
                    client: H3Client = c  # type: ignore[assignment]
                    for _ in range(3):
                        t = time.perf_counter()
                        status, _, body = await client.request("GET", path, headers, timeout=900)
                        assert status == 200 and len(body) == BIG, status
                        best = max(best, BIG / (time.perf_counter() - t) / 1e6)
                        del body
            return best
        except (ConnectionError, TimeoutError):
            if attempt == 49:
                raise
            await asyncio.sleep(0.2)
    return best


async def references(tmp: Path, cert: Path, key: Path, blob: Path, tls_port: int) -> list[str]:
    """Issue 18's lines: CallFS next to nginx over TLS and to aioquic's example server."""
    lines = []
    root = tmp / "www"
    root.mkdir()
    os.link(blob, root / "big.bin")
    nginx_port, quic_port = free_port(), free_port()
    nginx = start_nginx_tls(tmp, nginx_port, root, cert, key)
    example = start_aioquic_example(quic_port, cert, key, blob)
    try:
        await asyncio.sleep(1.0)
        ours = curl_get(f"https://127.0.0.1:{tls_port}/v1/files/b/big.bin", cert, H)
        theirs = curl_get(f"https://127.0.0.1:{nginx_port}/big.bin", cert, {})
        lines.append(
            f"| HTTPS GET 256 MiB (curl) vs nginx over TLS | {ours:,.0f} MB/s | {theirs:,.0f} MB/s"
            f" | {ours / theirs:.2f}x | >= 0.9x |"
        )
        ours = await h3_get(tls_port, cert, "/v1/files/b/h3.bin", H)
        theirs = await h3_get(quic_port, cert, "/big.bin", {})
        lines.append(
            f"| HTTP/3 GET 256 MiB vs aioquic's example server | {ours:,.0f} MB/s |"
            f" {theirs:,.0f} MB/s | {ours / theirs:.2f}x | >= 0.8x |"
        )
    finally:
        for p in (nginx, example):
            p.terminate()
            p.wait(30)
    return lines


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
            refs = await references(tmp, cert, key, blob, tls_port)
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
    print()
    print("| goal | CallFS | reference | ratio | target |")
    print("|---|---:|---:|---:|---|")
    for line in refs:
        print(line)


if __name__ == "__main__":
    asyncio.run(main())
