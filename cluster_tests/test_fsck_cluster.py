"""fsck across three ``callfs server`` processes sharing a private PostgreSQL database (Redis
locks under a private prefix): findings planted on two nodes are reported, with their node IDs,
by ``callfs fsck`` asked through the third; a PUT race through two nodes leaves no orphan once the
sweep has run (docs/operations.md)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from callfs.storage.base import new_blob_key
from cluster_tests.harness import API_KEY, INTERNAL, ClusterNode, free_ports, node_config

pytestmark = pytest.mark.slow
H = {"Authorization": f"Bearer {API_KEY}"}
INTERNAL_AUTH = {"Authorization": f"Bearer {INTERNAL}"}
PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
OLD = time.time() - 2 * 3600
GRACE = "600"


@pytest.fixture
async def database() -> AsyncIterator[str]:
    db = f"callfs_fsck_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    await conn.execute(f'CREATE DATABASE "{db}"')
    await conn.close()
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{db}"
    finally:
        conn = await asyncpg.connect(PG_ADMIN_DSN)
        await conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        await conn.close()


@pytest.fixture
def cluster(tmp_path: Path, database: str) -> Iterator[list[ClusterNode]]:
    names = ["node-a", "node-b", "node-c"]
    ports = free_ports(len(names))
    peers = {n: f"http://127.0.0.1:{p}" for n, p in zip(names, ports, strict=True)}
    dlm = {
        "type": "redis",
        "redis_addr": "127.0.0.1:6379",
        "redis_key_prefix": f"callfs-fsck-{uuid.uuid4().hex[:12]}:",
    }
    nodes = [
        ClusterNode(
            name,
            port,
            tmp_path,
            node_config(name, port, tmp_path, peers, {"type": "postgres", "dsn": database}, dlm),
        )
        for name, port in zip(names, ports, strict=True)
    ]
    try:
        for node in nodes:
            node.start()
        yield nodes
    finally:
        for node in nodes:
            node.stop()
        for node in nodes:
            print(f"---- {node.name} log ----\n{node.logs()}")


def blob_file(tmp_path: Path, node: str, key: str) -> Path:
    return tmp_path / node / "files" / ".callfs" / "blobs" / key[:2] / key[2:4] / key


def plant(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, (OLD, OLD))
    return path


def run_fsck(node: ClusterNode, *extra: str) -> tuple[int, dict[str, Any]]:
    """``callfs fsck --json`` as an operator runs it, asked through ``node``."""
    done = subprocess.run(
        [sys.executable, "-m", "callfs", "fsck", "--json", "--url", node.base,
         "--internal-secret", INTERNAL, *extra],
        capture_output=True,
        timeout=120,
        check=False,
    )  # fmt: skip
    assert done.stdout, done.stderr
    return done.returncode, json.loads(done.stdout)


async def stored_key(s: aiohttp.ClientSession, node: ClusterNode, path: str, body: bytes) -> str:
    """PUT ``path`` through ``node`` and return the blob key its record names (the database)."""
    async with s.put(f"{node.base}/v1/files{path}", data=io.BytesIO(body), headers=H) as r:
        assert r.status in (200, 201), await r.text()
    return await blob_key_of(path)


DSN: dict[str, str] = {}


async def blob_key_of(path: str) -> str:
    conn = await asyncpg.connect(DSN["dsn"])
    try:
        key = await conn.fetchval("SELECT blob_key FROM entries WHERE path = $1", path)
    finally:
        await conn.close()
    assert isinstance(key, str)
    return key


async def test_fsck_through_a_third_node_reports_both_nodes(
    cluster: list[ClusterNode], tmp_path: Path, database: str
) -> None:
    DSN["dsn"] = database
    a, b, c = cluster
    async with aiohttp.ClientSession() as s:
        gone = await stored_key(s, a, "/a/gone.txt", b"on node a")
        await stored_key(s, a, "/a/fine.txt", b"fine")
        short = await stored_key(s, b, "/b/short.txt", b"0123456789")
    blob_file(tmp_path, "node-a", gone).unlink()  # missing on node-a
    orphan_a = new_blob_key()
    plant(blob_file(tmp_path, "node-a", orphan_a), b"orphan on a")
    os.truncate(blob_file(tmp_path, "node-b", short), 3)  # size-mismatch on node-b
    temp_b = plant(tmp_path / "node-b" / "files" / ".callfs" / "tmp" / "abad1dea.part", b"tmp")
    orphan_b = new_blob_key()
    plant(blob_file(tmp_path, "node-b", orphan_b), b"orphan on b")

    code, report = await asyncio.to_thread(run_fsck, c, "--grace", GRACE)
    assert code == 1, json.dumps(report)
    assert report["coordinator"] == "node-c"
    assert sorted(report["nodes"]) == ["node-a", "node-b", "node-c"]
    assert report["entries_checked"] == 3
    found = {(f["kind"], f["node"], f["key"]): f for f in report["findings"]}
    assert set(found) == {
        ("missing", "node-a", gone),
        ("orphan", "node-a", orphan_a),
        ("size-mismatch", "node-b", short),
        ("stale-temp", "node-b", ".callfs/tmp/abad1dea.part"),
        ("orphan", "node-b", orphan_b),
    }, report
    assert found[("missing", "node-a", gone)]["path"] == "/a/gone.txt"
    assert found[("size-mismatch", "node-b", short)]["size"] == 3

    code, report = await asyncio.to_thread(run_fsck, c, "--grace", GRACE, "--repair")
    assert code == 1  # missing and size-mismatch cannot be repaired
    repaired = {(f["node"], f["key"]) for f in report["findings"] if f["repaired"]}
    assert repaired == {
        ("node-a", orphan_a),
        ("node-b", orphan_b),
        ("node-b", ".callfs/tmp/abad1dea.part"),
    }
    assert not blob_file(tmp_path, "node-a", orphan_a).exists()
    assert not blob_file(tmp_path, "node-b", orphan_b).exists()
    assert not temp_b.exists()
    assert blob_file(tmp_path, "node-b", short).exists()
    code, report = await asyncio.to_thread(run_fsck, a, "--grace", GRACE)
    assert report["counts"] == {"orphan": 0, "missing": 1, "size-mismatch": 1, "stale-temp": 0}


async def test_put_race_leaves_no_orphan_after_the_sweep(
    cluster: list[ClusterNode], tmp_path: Path
) -> None:
    a, b, c = cluster
    races = 6
    async with aiohttp.ClientSession() as s:

        async def put(node: ClusterNode, path: str, body: bytes) -> int:
            async with s.put(f"{node.base}/v1/files{path}", data=io.BytesIO(body), headers=H) as r:
                return r.status

        bodies = {}
        for i in range(races):
            path = f"/race/{i}.bin"
            one, two = os.urandom(1 << 20), os.urandom(1 << 20)
            bodies[path] = {one, two}
            statuses = await asyncio.gather(put(a, path, one), put(b, path, two))
            assert sorted(statuses) in ([200, 201], [201, 201], [200, 200]), statuses
        for path, possible in bodies.items():
            async with s.get(f"{c.base}/v1/files{path}", headers=H) as r:
                assert r.status == 200
                assert await r.read() in possible

        # The race leaves the loser's bytes on its node (grace 0: every unreferenced blob).
        code, report = await asyncio.to_thread(run_fsck, c, "--grace", "0")
        orphans = [f for f in report["findings"] if f["kind"] == "orphan"]
        print(f"the races left {len(orphans)} orphan(s): {orphans}")
        assert orphans  # the replaced version's bytes stay on the node that lost
        assert {f["node"] for f in orphans} <= {"node-a", "node-b"}
        assert report["counts"]["missing"] == report["counts"]["size-mismatch"] == 0

        # The periodic sweep's pass (Fsck.sweep = scan_local with repair), run now on each node.
        for node in cluster:
            body = {"repair": True, "grace": 0, "shared": True}
            async with s.post(
                f"{node.base}/v1/internal/fsck/local", json=body, headers=INTERNAL_AUTH
            ) as r:
                assert r.status == 200, await r.text()

    code, report = await asyncio.to_thread(run_fsck, b, "--grace", "0")
    assert code == 0, report
    assert report["findings"] == []
    blobs = [p for n in ("node-a", "node-b", "node-c") for p in
             (tmp_path / n / "files" / ".callfs" / "blobs").rglob("*") if p.is_file()]  # fmt: skip
    assert len(blobs) == races  # one blob per file, nothing else
