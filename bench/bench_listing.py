"""Issue 13 figures, "Directories of any size": a 1,000,000-entry directory, served by a real
``callfs server`` process per store. For each store: the latency of the first page
(``GET /v1/directories/big?limit=N``, goal < 50 ms) and of a page deep in the directory (a cursor
half-way), then a full unpaginated listing streamed (time, bytes) and the server's peak RSS during
it (the kernel's high-water mark, reset just before: ``/proc/<pid>/clear_refs``). ``--in-memory``
adds, for contrast, the peak of a listing built in memory as v1 did (a recursive listing of the
same directory, which still builds one list). ``--repeat N`` adds the best of N whole listings in
ms: the store's ``list_children`` (called in-process, before the server starts) and the streamed
HTTP listing (issue 14 goal on Redis: < 100 ms for 10,000 entries, both).

    python bench/bench_listing.py [--entries 1000000] [--stores sqlite,postgres,redis] [--in-memory]
    python bench/bench_listing.py --entries 10000 --stores redis --repeat 10

The directory is built straight in the store (bulk SQL / COPY / pipelined Redis writes), not
through the API. PostgreSQL (127.0.0.1:5432, user postgres, trust) gets a private database and
Redis (127.0.0.1:6379) a private key prefix; both are removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

from callfs.metadata import sqlite_ops as ops
from callfs.model import BackendType, Entry, EntryType

KEY = "bench-key-0123456789abcdef"
H = {"Authorization": f"Bearer {KEY}"}
DIR_SHARE = 10  # one entry in ten is a directory: pages cross the file/directory boundary
PG_ADMIN = "postgresql://postgres@127.0.0.1/postgres"
REDIS = "127.0.0.1:6379"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def names(n: int) -> tuple[list[str], list[str]]:
    dirs = n // DIR_SHARE
    return [f"f{i:07d}" for i in range(n - dirs)], [f"d{i:07d}" for i in range(dirs)]


def row(path: str, kind: str, parent: str, name: str) -> tuple[Any, ...]:
    """An ``entries`` row: ``ENTRY_COLUMNS``, then parent and name."""
    size = 4096 if kind == "file" else 0
    t = 1_700_000_000
    return (path, kind, size, "bench", t, "localfs", None, 1, t, False, None, parent, name)


def rows(n: int) -> list[tuple[Any, ...]]:
    """The rows of /big and its children."""
    files, dirs = names(n)
    out = [row("/big", "directory", "/", "big")]
    out += [row(f"/big/{name}", "file", "/big", name) for name in files]
    out += [row(f"/big/{name}", "directory", "/big", name) for name in dirs]
    return out


# ---- building the directory ------------------------------------------------------------------
def build_sqlite(path: str, n: int) -> None:
    conn = ops.connect(path, synchronous="OFF")
    ops.migrate(conn)
    conn.execute("BEGIN")
    conn.executemany(f"INSERT INTO entries VALUES ({','.join('?' * 13)})", _sqlite_order(rows(n)))
    conn.execute("COMMIT")
    conn.execute("ANALYZE")
    conn.close()


def _sqlite_order(raw: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Rows in the table's column order: path, parent, name, type, size, owner, mtime,
    backend_type, instance_id, version, created_at, erasure_coded, blob_key."""
    return [(r[0], r[11], r[12], *r[1:10], r[10]) for r in raw]


async def build_postgres(dsn: str, n: int) -> None:
    import asyncpg

    from callfs.metadata.postgres import PostgresMetadataStore

    store = PostgresMetadataStore(dsn, op_timeout=600)
    await store.start()  # the schema
    await store.close()
    conn = await asyncpg.connect(dsn)
    try:
        columns = [
            *(c.strip() for c in ops.ENTRY_COLUMNS.split(",")),
            "parent",
            "name",
        ]
        await conn.copy_records_to_table("entries", records=rows(n), columns=columns)
        await conn.execute("VACUUM ANALYZE entries")
    finally:
        await conn.close()


async def build_redis(prefix: str, n: int) -> None:
    import redis.asyncio as aioredis

    from callfs.metadata.redis import _fields, _member

    r = aioredis.Redis(host="127.0.0.1", port=6379)
    try:
        files, dirs = names(n)
        big = Entry(
            path="/big",
            type=EntryType.DIRECTORY,
            size=0,
            owner="bench",
            mtime=1_700_000_000,
            backend_type=BackendType.LOCALFS,
            instance_id=None,
            created_at=1_700_000_000,
        )
        from callfs.metadata.common import ROOT

        await r.hset(f"{prefix}e:/", items=_fields(ROOT))  # type: ignore[misc]
        await r.hset(f"{prefix}e:/big", items=_fields(big))  # type: ignore[misc]
        await r.zadd(f"{prefix}c:/", {_member(EntryType.DIRECTORY, "/big"): 0})
        every = [(EntryType.FILE, f) for f in files] + [(EntryType.DIRECTORY, d) for d in dirs]
        for i in range(0, len(every), 10_000):
            pipe = r.pipeline(transaction=False)
            members: dict[str, int] = {}
            for kind, name in every[i : i + 10_000]:
                e = Entry(
                    path=f"/big/{name}",
                    type=kind,
                    size=4096 if kind is EntryType.FILE else 0,
                    owner="bench",
                    mtime=1_700_000_000,
                    backend_type=BackendType.LOCALFS,
                    instance_id=None,
                    created_at=1_700_000_000,
                )
                pipe.hset(f"{prefix}e:{e.path}", items=_fields(e))
                members[_member(kind, e.path)] = 0
            pipe.zadd(f"{prefix}c:/big", members)
            await pipe.execute()
    finally:
        await r.aclose()


async def drop_redis(prefix: str) -> None:
    import redis.asyncio as aioredis

    r = aioredis.Redis(host="127.0.0.1", port=6379)
    try:
        batch: list[bytes] = []
        async for key in r.scan_iter(match=f"{prefix}*", count=10_000):
            batch.append(key)
            if len(batch) >= 10_000:
                await r.unlink(*batch)
                batch.clear()
        if batch:
            await r.unlink(*batch)
    finally:
        await r.aclose()


# ---- measuring -------------------------------------------------------------------------------
def proc_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS


def cursor(kind: str, name: str) -> str:
    return kind + "/" + base64.urlsafe_b64encode(name.encode()).rstrip(b"=").decode()


async def page_latency(s: aiohttp.ClientSession, url: str, runs: int = 30) -> tuple[float, float]:
    lat: list[float] = []
    for _ in range(runs):
        t = time.perf_counter()
        async with s.get(url, headers=H) as resp:
            assert resp.status == 200, await resp.text()
            await resp.read()
        lat.append((time.perf_counter() - t) * 1e3)
    lat.sort()
    return statistics.median(lat), lat[-1]


async def full_listing(s: aiohttp.ClientSession, url: str) -> tuple[float, int, int, int]:
    """Seconds, bytes, X-CallFS-Count and items seen (``},{`` separators + 1) of a streamed
    listing, read a chunk at a time (the client keeps no body either)."""
    t = time.perf_counter()
    size = seps = 0
    carry = b""
    async with s.get(url, headers=H, timeout=aiohttp.ClientTimeout(total=3600)) as resp:
        assert resp.status == 200
        count = int(resp.headers["X-CallFS-Count"])
        async for chunk in resp.content.iter_chunked(1 << 20):
            size += len(chunk)
            seps += (carry + chunk).count(b"},{")
            carry = chunk[-2:]
    return time.perf_counter() - t, size, count, seps + 1


async def store_listing(store: Any, n: int, repeat: int) -> str:
    """Best of ``repeat`` ``list_children("/big")`` calls, ms (the store opened in-process)."""
    await store.start()
    try:
        best = float("inf")
        for _ in range(repeat):
            t = time.perf_counter()
            got = await store.list_children("/big")
            best = min(best, time.perf_counter() - t)
            assert len(got) == n, len(got)
    finally:
        await store.close()
    return f"{best * 1e3:.1f}"


async def measure(
    name: str, meta_yaml: str, n: int, in_memory: bool, tmp: str, repeat: int = 0
) -> dict[str, str]:
    port = free_port()
    # A listing built in memory is one store call: 1,000,000 entries take longer than the default
    # metadata_op_timeout (5 s, which then answers 503); a streamed listing is bounded per page.
    timeout = ", metadata_op_timeout: 600s" if in_memory else ""
    cfg = Path(tmp) / f"{name}.yaml"
    cfg.write_text(
        f"""server: {{protocol: http, cert_file: "", key_file: "",
  listen_addr: "127.0.0.1:{port}", external_url: "http://127.0.0.1:{port}"{timeout}}}
metrics: {{listen_addr: ""}}
log: {{level: warn, format: console}}
auth: {{api_keys: ["{KEY}"], internal_proxy_secret: bench-internal-0123456789,
  single_use_link_secret: bench-link-0123456789}}
metadata_store: {meta_yaml}
dlm: {{type: local}}
backend: {{localfs_root_path: "{tmp}/files-{name}"}}
"""
    )
    proc = subprocess.Popen([sys.executable, "-m", "callfs", "server", "-c", str(cfg)], cwd=tmp)
    out: dict[str, str] = {}
    try:
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as s:
            for _ in range(300):
                try:
                    async with s.get(base + "/health"):
                        break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
            files, _dirs = names(n)
            big = f"{base}/v1/directories/big"
            p50, worst = await page_latency(s, big + "?limit=1000")
            out["first page, limit=1000 (p50 / max ms)"] = f"{p50:.1f} / {worst:.1f}"
            p50, worst = await page_latency(s, big + "?limit=100")
            out["first page, limit=100 (p50 / max ms)"] = f"{p50:.1f} / {worst:.1f}"
            middle = cursor("f", files[len(files) // 2])
            p50, worst = await page_latency(s, f"{big}?limit=1000&after={middle}")
            out["page half-way, limit=1000 (p50 / max ms)"] = f"{p50:.1f} / {worst:.1f}"
            boundary = cursor("f", files[-500])
            p50, worst = await page_latency(s, f"{big}?limit=1000&after={boundary}")
            out["page across files/dirs (p50 / max ms)"] = f"{p50:.1f} / {worst:.1f}"

            base_rss = proc_kib(proc.pid, "VmRSS")
            reset_peak(proc.pid)
            secs, size, count, items = await full_listing(s, big)
            peak = proc_kib(proc.pid, "VmHWM")
            assert count == n and items == n, (count, items)
            out["full listing, streamed (s)"] = f"{secs:.1f}"
            out["full listing (MB, entries/s)"] = f"{size / 1e6:.0f}, {n / secs:,.0f}"
            out["server RSS before -> peak (MiB)"] = f"{base_rss / 1024:.0f} -> {peak / 1024:.0f}"
            if repeat:
                best = min([(await full_listing(s, big))[0] for _ in range(repeat)])
                out[f"full listing, HTTP, best of {repeat} (ms)"] = f"{best * 1e3:.1f}"
            if in_memory:
                reset_peak(proc.pid)
                secs, size, count, items = await full_listing(
                    s, big + "?recursive=true&max_depth=1"
                )
                peak = proc_kib(proc.pid, "VmHWM")
                out["in-memory listing (s, peak MiB)"] = f"{secs:.1f}, {peak / 1024:.0f}"
    finally:
        proc.terminate()
        proc.wait(60)
    return out


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument("--stores", default="sqlite,postgres,redis")
    ap.add_argument("--in-memory", action="store_true", help="also time a v1-style listing")
    ap.add_argument(
        "--repeat", type=int, default=0, help="also the best of N whole listings (store, HTTP)"
    )
    args = ap.parse_args()
    n = args.entries
    repeat = args.repeat
    results: dict[str, dict[str, str]] = {}
    store_ms: dict[str, str] = {}
    label = f"list_children, in-process, best of {repeat} (ms)"
    with tempfile.TemporaryDirectory() as tmp:
        for store in args.stores.split(","):
            t = time.perf_counter()
            if store == "sqlite":
                db = os.path.join(tmp, "m.sqlite3")
                await asyncio.to_thread(build_sqlite, db, n)
                plan = sqlite3.connect(db).execute(
                    "EXPLAIN QUERY PLAN SELECT path FROM entries INDEXED BY entries_children"
                    " WHERE parent = ? AND type = ? AND name > ? AND path != '/'"
                    " ORDER BY name LIMIT 10",
                    ("/big", "file", ""),
                )
                print("sqlite page plan:", [r[3] for r in plan])
                print(f"sqlite: built {n:,} entries in {time.perf_counter() - t:.1f} s")
                meta = f'{{type: sqlite, sqlite_path: "{db}"}}'
                if repeat:
                    from callfs.metadata.sqlite import SqliteMetadataStore

                    store_ms[store] = await store_listing(SqliteMetadataStore(db), n, repeat)
                results[store] = await measure(store, meta, n, args.in_memory, tmp, repeat)
            elif store == "postgres":
                import asyncpg

                name = f"callfs_bench_listing_{uuid.uuid4().hex[:8]}"
                admin = await asyncpg.connect(PG_ADMIN)
                await admin.execute(f'CREATE DATABASE "{name}"')
                dsn = f"postgresql://postgres@127.0.0.1/{name}?sslmode=disable"
                try:
                    await build_postgres(dsn, n)
                    print(f"postgres: built {n:,} entries in {time.perf_counter() - t:.1f} s")
                    meta = f'{{type: postgres, dsn: "{dsn}"}}'
                    if repeat:
                        from callfs.metadata.postgres import PostgresMetadataStore

                        pg = PostgresMetadataStore(dsn, op_timeout=600)
                        store_ms[store] = await store_listing(pg, n, repeat)
                    results[store] = await measure(store, meta, n, args.in_memory, tmp, repeat)
                finally:
                    await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
                    await admin.close()
            elif store == "redis":
                prefix = f"callfs-bench-listing-{uuid.uuid4().hex[:8]}:"
                try:
                    await build_redis(prefix, n)
                    print(f"redis: built {n:,} entries in {time.perf_counter() - t:.1f} s")
                    meta = f'{{type: redis, redis_addr: "{REDIS}", redis_key_prefix: "{prefix}"}}'
                    if repeat:
                        from callfs.metadata.redis import RedisMetadataStore

                        rs = RedisMetadataStore(REDIS, key_prefix=prefix, op_timeout=600)
                        store_ms[store] = await store_listing(rs, n, repeat)
                    results[store] = await measure(store, meta, n, args.in_memory, tmp, repeat)
                finally:
                    await drop_redis(prefix)
            else:
                raise SystemExit(f"unknown store {store}")
            if store in store_ms:
                results[store][label] = store_ms[store]
    stores = list(results)
    print(f"\n{n:,} entries in one directory ({n // DIR_SHARE:,} of them directories)\n")
    print("| figure | " + " | ".join(stores) + " |")
    print("|---|" + "---:|" * len(stores))
    for row in results[stores[0]]:
        print(f"| {row} | " + " | ".join(results[s].get(row, "") for s in stores) + " |")


if __name__ == "__main__":
    asyncio.run(main())
