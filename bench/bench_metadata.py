"""Metadata store figures, side by side in one run (issue 4): create, stat, rename and delete
latency p50/p99 and ops/s at 16 concurrent clients; listing a 10,000-entry directory; recursive
listing of a 10,000-entry tree. Direct store calls (the HTTP figures are in bench_http.sh).

    python bench/bench_metadata.py [--ops 3000] [--stores sqlite,postgres,redis]

Needs PostgreSQL (127.0.0.1:5432, user postgres, trust) and Redis (127.0.0.1:6379); it creates
and drops its own database and key prefix.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from callfs.metadata.base import MetadataStore
from callfs.model import BackendType, Entry, EntryType

CLIENTS = 16


def entry(path: str, is_dir: bool = False) -> Entry:
    return Entry(
        path=path,
        type=EntryType.DIRECTORY if is_dir else EntryType.FILE,
        size=0 if is_dir else 4096,
        owner="bench",
        mtime=1_700_000_000,
        backend_type=BackendType.LOCALFS,
        instance_id="node-1",
    )


async def timed(ops: list[Callable[[], Awaitable[object]]]) -> tuple[float, float, float]:
    """Run ops with CLIENTS workers; return (ops/s, p50 ms, p99 ms)."""
    lat: list[float] = []
    queue = list(reversed(ops))

    async def worker() -> None:
        while queue:
            op = queue.pop()
            t = time.perf_counter()
            await op()
            lat.append(time.perf_counter() - t)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CLIENTS)))
    wall = time.perf_counter() - start
    lat.sort()
    return len(ops) / wall, statistics.median(lat) * 1e3, lat[int(len(lat) * 0.99) - 1] * 1e3


async def run_store(name: str, store: MetadataStore, n: int) -> dict[str, str]:
    await store.start()
    out: dict[str, str] = {}
    try:
        await store.create(entry("/b", True))
        paths = [f"/b/f{i:06d}" for i in range(n)]

        def fmt(r: tuple[float, float, float]) -> str:
            return f"{r[0]:,.0f}/s  p50 {r[1]:.2f}  p99 {r[2]:.2f} ms"

        out["create"] = fmt(await timed([lambda p=p: store.create(entry(p)) for p in paths]))
        out["stat"] = fmt(await timed([lambda p=p: store.get(p) for p in paths]))
        out["rename"] = fmt(await timed([lambda p=p: store.move_tree(p, p + ".r") for p in paths]))
        out["delete"] = fmt(await timed([lambda p=p: store.delete(p + ".r") for p in paths]))

        await store.create(entry("/flat", True))
        await timed([lambda i=i: store.create(entry(f"/flat/f{i:05d}")) for i in range(10_000)])
        t = time.perf_counter()
        listed = await store.list_children("/flat")
        out["list 10k dir"] = f"{(time.perf_counter() - t) * 1e3:.0f} ms ({len(listed)} entries)"

        await store.create(entry("/tree", True))
        dirs = [f"/tree/d{d:03d}" for d in range(100)]
        await timed([lambda p=p: store.create(entry(p, True)) for p in dirs])
        files = [f"{d}/f{i:02d}" for d in dirs for i in range(99)]
        await timed([lambda p=p: store.create(entry(p)) for p in files])
        t = time.perf_counter()
        tree = await store.list_tree("/tree", 100)
        out["list 10k tree"] = f"{(time.perf_counter() - t) * 1e3:.0f} ms ({len(tree)} entries)"
    finally:
        await store.close()
    return out


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ops", type=int, default=3000)
    ap.add_argument("--stores", default="sqlite,postgres,redis")
    args = ap.parse_args()
    results: dict[str, dict[str, str]] = {}
    for name in args.stores.split(","):
        if name == "sqlite":
            from callfs.metadata.sqlite import SqliteMetadataStore

            with tempfile.TemporaryDirectory() as tmp:
                path = str(Path(tmp) / "bench.sqlite3")
                results[name] = await run_store(name, SqliteMetadataStore(path), args.ops)
        elif name == "postgres":
            import asyncpg

            from callfs.metadata.postgres import PostgresMetadataStore

            db = f"callfs_bench_{uuid.uuid4().hex[:8]}"
            admin = await asyncpg.connect("postgresql://postgres@127.0.0.1/postgres")
            await admin.execute(f'CREATE DATABASE "{db}"')
            try:
                store = PostgresMetadataStore(
                    f"postgresql://postgres@127.0.0.1/{db}", max_size=CLIENTS
                )
                results[name] = await run_store(name, store, args.ops)
            finally:
                await admin.execute(f'DROP DATABASE "{db}" WITH (FORCE)')
                await admin.close()
        elif name == "redis":
            import redis.asyncio as aioredis

            from callfs.metadata.redis import RedisMetadataStore

            prefix = f"callfs-bench-{uuid.uuid4().hex[:8]}:"
            try:
                results[name] = await run_store(
                    name, RedisMetadataStore("127.0.0.1:6379", key_prefix=prefix), args.ops
                )
            finally:
                r = aioredis.Redis()
                keys = [k async for k in r.scan_iter(match=prefix + "*", count=5000)]
                for i in range(0, len(keys), 5000):
                    await r.delete(*keys[i : i + 5000])
                await r.aclose()
    names = list(results)
    print(f"| operation ({CLIENTS} clients, {args.ops} ops) | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for row in results[names[0]]:
        print(f"| {row} | " + " | ".join(results[n][row] for n in names) + " |")


if __name__ == "__main__":
    asyncio.run(main())
