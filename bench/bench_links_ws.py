"""Issue 3 figures: single-use link generation and redemption latency (p50/p99) at 16 connections,
and WebSocket upload/download of a 64 MiB file next to plain HTTP PUT/GET, in one run against a real
``callfs server`` process on 127.0.0.1.

    python bench/bench_links_ws.py [--links 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

KEY = "bench-key-0123456789abcdef"
H = {"Authorization": f"Bearer {KEY}"}
CLIENTS = 16
SIZE = 64 * 1024 * 1024
DOWNLOADS = 9


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(lat: list[float]) -> str:
    lat = sorted(lat)
    p99 = lat[int(len(lat) * 0.99) - 1]
    return f"p50 {statistics.median(lat) * 1e3:.2f} ms, p99 {p99 * 1e3:.2f} ms"


async def links(base: str, n: int) -> None:
    async with aiohttp.ClientSession(base, connector=aiohttp.TCPConnector(limit=CLIENTS)) as s:
        async with s.put("/v1/files/l/f.txt", data=b"x" * 1024, headers=H) as r:
            assert r.status in (200, 201)
        gen_lat: list[float] = []
        tokens: list[str] = []

        # Limits are per client IP (100/s burst 1, 10/s burst 5): pace the load to the limit's
        # rate from several loopback source addresses so the figures are latencies, not 429s.
        async def generate(i: int) -> None:
            await asyncio.sleep(i * 0.0105)
            t = time.perf_counter()
            async with s.post(
                "/v1/links/generate", json={"path": "/l/f.txt", "expiry_seconds": 600}, headers=H
            ) as r:
                body = await r.json()
            gen_lat.append(time.perf_counter() - t)
            if r.status == 201:
                tokens.append(body["token"])

        sem = asyncio.Semaphore(CLIENTS)

        async def bounded(i: int) -> None:
            async with sem:
                await generate(i)

        await asyncio.gather(*(bounded(i) for i in range(n)))
        print(f"link generation: {len(tokens)}/{n} ok, {pct(gen_lat)}")
        red_lat: list[float] = []
        statuses: dict[int, int] = {}

        async def redeem(i: int, token: str) -> None:
            await asyncio.sleep(i * 0.101)
            t = time.perf_counter()
            async with s.get(f"/download/{token}") as r:
                await r.read()
            red_lat.append(time.perf_counter() - t)
            statuses[r.status] = statuses.get(r.status, 0) + 1

        sample = tokens[:100]
        await asyncio.gather(*(redeem(i, tok) for i, tok in enumerate(sample)))
        print(
            f"link redemption ({len(sample)} links, paced to the 10/s limit): {statuses}, "
            f"{pct(red_lat)}"
        )


async def transfers(base: str, ws_base: str) -> None:
    blob = os.urandom(SIZE)
    chunks = [blob[i : i + 65536] for i in range(0, SIZE, 65536)]
    async with aiohttp.ClientSession(base) as s:
        t = time.perf_counter()
        async with s.put("/v1/files/t/http.bin", data=blob, headers=H) as r:
            assert r.status in (200, 201)
        http_put = SIZE / (time.perf_counter() - t) / 1e6
        t = time.perf_counter()
        ws = await s.ws_connect(
            f"{ws_base}/v1/files/ws/t/ws.bin?mode=upload", headers=H, max_msg_size=4 << 20
        )
        for c in chunks:
            await ws.send_bytes(c)
        await ws.send_str("EOF")
        ack = [m.data async for m in ws]
        ws_put = SIZE / (time.perf_counter() - t) / 1e6
        assert ack == [f"ok:{SIZE}"], ack

        async def http_get() -> float:
            t = time.perf_counter()
            async with s.get("/v1/files/t/http.bin", headers=H) as r:
                got = 0
                async for c in r.content.iter_chunked(1 << 20):
                    got += len(c)
            assert got == SIZE
            return SIZE / (time.perf_counter() - t) / 1e6

        async def ws_get() -> float:
            t = time.perf_counter()
            ws = await s.ws_connect(
                f"{ws_base}/v1/files/ws/t/ws.bin", headers=H, max_msg_size=4 << 20
            )
            got = 0
            async for m in ws:
                got += len(m.data)
            assert got == SIZE
            return SIZE / (time.perf_counter() - t) / 1e6

        # A 64 MiB download takes tens of milliseconds: one of each is mostly noise. Alternated,
        # median of DOWNLOADS.
        gets: list[float] = []
        ws_gets: list[float] = []
        for _ in range(DOWNLOADS):
            gets.append(await http_get())
            ws_gets.append(await ws_get())
        http_get_mbs, ws_get_mbs = statistics.median(gets), statistics.median(ws_gets)
    print("| 64 MiB | HTTP MB/s | WebSocket MB/s | ratio (goal >= 0.7) |")
    print("|---|---:|---:|---:|")
    print(f"| upload | {http_put:.0f} | {ws_put:.0f} | {ws_put / http_put:.2f} |")
    print(
        f"| download (median of {DOWNLOADS}) | {http_get_mbs:.0f} | {ws_get_mbs:.0f} |"
        f" {ws_get_mbs / http_get_mbs:.2f} |"
    )


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--links", type=int, default=1000)
    args = ap.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "c.yaml"
        cfg.write_text(
            f"""server: {{protocol: http, cert_file: "", key_file: "",
  listen_addr: "127.0.0.1:{port}", external_url: "http://127.0.0.1:{port}"}}
metrics: {{listen_addr: ""}}
log: {{level: warn, format: console}}
auth: {{api_keys: ["{KEY}"], internal_proxy_secret: bench-internal-0123456789,
  single_use_link_secret: bench-link-0123456789}}
metadata_store: {{type: sqlite, sqlite_path: "{tmp}/m.sqlite3"}}
dlm: {{type: local}}
backend: {{localfs_root_path: "{tmp}/files"}}
"""
        )
        proc = subprocess.Popen([sys.executable, "-m", "callfs", "server", "-c", str(cfg)], cwd=tmp)
        try:
            base = f"http://127.0.0.1:{port}"
            for _ in range(100):
                try:
                    async with aiohttp.ClientSession() as s, s.get(base + "/health"):
                        break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
            await links(base, args.links)
            await transfers(base, f"ws://127.0.0.1:{port}")
        finally:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    asyncio.run(main())
