"""HA replication's work queue outlives the node holding its items (issue 14): three ``callfs
server`` processes share a private PostgreSQL database (metadata and the work queue), Redis locks
and one S3 bucket (moto's server, a separate process, as the replica backend); files live on the
nodes' local disks.

A worker claims queue items with a lease (``core/replication.py``: ``LEASE`` = 60 s, a module
constant; a subprocess test cannot shorten it, so this test waits it out, about 70 s). With the S3
server frozen (SIGSTOP) every copy stalls, so node-a's worker is left holding the items it
claimed; node-a is then killed with SIGKILL and S3 thawed. The items node-a held stay leased to it
(no other node takes a live lease) until the lease runs out; then node-b's worker claims them and
every file has its replica copy.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import boto3
import pytest

from callfs.core.replication import LEASE
from cluster_tests.harness import (
    API_KEY,
    ClusterNode,
    free_ports,
    node_config,
    private_pg_database,
)

pytestmark = pytest.mark.slow
H = {"Authorization": f"Bearer {API_KEY}"}
NAMES = ["node-a", "node-b", "node-c"]
FILES = 12
CREDS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, str]]:
    """moto's S3 server in its own process (so it can be frozen), and a fresh bucket."""
    (port,) = free_ports(1)
    endpoint = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "moto.log", "wb")  # noqa: SIM115 - the child's for its lifetime
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    try:
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **CREDS)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.list_buckets()
                break
            except Exception:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.2)
        bucket = f"callfs-takeover-{uuid.uuid4().hex[:8]}"
        client.create_bucket(Bucket=bucket)
        yield proc, endpoint, bucket
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
            proc.wait(30)


@pytest.fixture
async def database() -> AsyncIterator[dict[str, Any]]:
    async with private_pg_database("takeover") as store:
        yield store


@pytest.fixture
def cluster(
    tmp_path: Path,
    database: dict[str, Any],
    s3: tuple[subprocess.Popen[bytes], str, str],
) -> Iterator[dict[str, ClusterNode]]:
    _, endpoint, bucket = s3
    ports = free_ports(len(NAMES))
    peers = {n: f"http://127.0.0.1:{p}" for n, p in zip(NAMES, ports, strict=True)}
    dlm = {
        "type": "redis",
        "redis_addr": "127.0.0.1:6379",
        "redis_key_prefix": f"callfs-takeover-{uuid.uuid4().hex[:8]}:",
    }
    nodes = {}
    for name, port in zip(NAMES, ports, strict=True):
        config = node_config(name, port, tmp_path, peers, database, dlm)
        config["backend"].update(
            {
                "default_backend": "localfs",
                "s3_bucket_name": bucket,
                "s3_endpoint": endpoint,
                "s3_access_key": "testing",
                "s3_secret_key": "testing",
                "s3_server_side_encryption": "",
            }
        )
        config["ha"] = {"replication_enabled": True, "replica_backend": "s3"}
        nodes[name] = ClusterNode(name, port, tmp_path, config)
    try:
        for node in nodes.values():
            node.start()
        yield nodes
    finally:
        for node in nodes.values():
            node.stop()
        for node in nodes.values():
            print(f"---- {node.name} log ----\n{node.logs()}")


async def queue(dsn: str) -> list[tuple[int, str | None, float]]:
    """(id, lease owner, lease until) of every item waiting in the work queue."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT id, lease_owner, lease_until FROM work_queue ORDER BY id")
    finally:
        await conn.close()
    return [(r["id"], r["lease_owner"], float(r["lease_until"])) for r in rows]


async def blob_keys(dsn: str) -> dict[str, str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT path, blob_key FROM entries WHERE type = 'file'")
    finally:
        await conn.close()
    return {r["path"]: r["blob_key"] for r in rows}


@pytest.mark.timeout(300)
async def test_queue_drained_by_another_node_after_the_holder_dies(
    cluster: dict[str, ClusterNode],
    database: dict[str, Any],
    s3: tuple[subprocess.Popen[bytes], str, str],
) -> None:
    a, b, c = (cluster[n] for n in NAMES)
    moto, endpoint, bucket = s3
    dsn = database["dsn"]
    c.stop()  # two workers: node-b's own write wakes node-b; node-a's poll takes the rest
    contents = {f"/rep/f{i}.bin": os.urandom(2000 + i) for i in range(FILES)}
    os.kill(moto.pid, signal.SIGSTOP)  # every replica copy stalls from here
    try:
        async with aiohttp.ClientSession() as s:
            for path, body in contents.items():
                async with s.put(f"{b.base}/v1/files{path}", data=io.BytesIO(body), headers=H) as r:
                    assert r.status == 201, await r.text()
        # node-b's worker claims the first item and stalls; node-a's idle poll (every 5 s)
        # claims the others and stalls on its first copy
        deadline = time.monotonic() + 20
        while True:
            items = await queue(dsn)
            held_by_a = [i for i in items if (i[1] or "").startswith("node-a/")]
            if held_by_a or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        print("queue before the kill:", items)
        assert held_by_a, items
        assert len(items) == FILES  # nothing copied yet
        a.kill()
    finally:
        os.kill(moto.pid, signal.SIGCONT)
    killed_at = time.time()
    lease_end = min(until for _, _, until in held_by_a)
    assert lease_end > killed_at + LEASE / 2  # the lease is LEASE seconds from the claim
    c.start()  # a third worker joins; either live node may take the items over

    a_ids = {i for i, _, _ in held_by_a}
    deadline = time.monotonic() + LEASE + 60
    while True:
        items = await queue(dsn)
        left = {i for i, _, _ in items}
        now = time.time()
        if now < lease_end - 1:  # a live lease is never taken over
            assert a_ids <= left, (a_ids, items)
            assert all((o or "").startswith("node-a/") for i, o, _ in items if i in a_ids)
        if not items:
            break
        assert time.monotonic() < deadline, items
        await asyncio.sleep(0.5)
    done_at = time.time()
    print(f"queue drained {done_at - killed_at:.1f}s after the kill (lease {LEASE:.0f}s)")
    assert done_at >= lease_end - 1

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **CREDS)
    listed = client.list_objects_v2(Bucket=bucket).get("Contents", [])
    objects = [o["Key"] for o in listed]
    for path, key in (await blob_keys(dsn)).items():
        found = [k for k in objects if k.endswith(key)]
        assert len(found) == 1, (path, key, objects)
        body = client.get_object(Bucket=bucket, Key=found[0])["Body"].read()
        assert body == contents[path]
