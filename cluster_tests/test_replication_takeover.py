"""HA replication's work queue outlives the node holding its items (issue 14): three ``callfs
server`` processes share a private PostgreSQL database (metadata and the work queue), Redis locks
and one S3 bucket (moto's server, a separate process, as the replica backend); files live on the
nodes' local disks.

A worker claims queue items with a short lease (``core/replication.py``: ``LEASE``) and renews it
while it works on them. With the S3 server frozen (SIGSTOP) every copy stalls: node-b's worker
holds the item of its own first write, node-a's the others, while node-c is frozen too. node-c
then thaws with nothing to do: for longer than a lease it polls next to the two stalled workers and
takes none of their items (they renew them). node-a is then killed with SIGKILL: its items stay
leased to it until its last renewal runs out, then node-c takes them over, within ``LEASE`` plus an
idle poll of the kill. Then S3 thaws and every file gets its replica copy.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import boto3
import pytest

from callfs.core.replication import IDLE_POLL, LEASE, RENEW_EVERY
from cluster_tests.harness import (
    API_KEY,
    CREDS,
    ClusterNode,
    free_ports,
    moto_server,
    node_config,
    private_pg_database,
)

pytestmark = pytest.mark.slow
H = {"Authorization": f"Bearer {API_KEY}"}
NAMES = ["node-a", "node-b", "node-c"]
FILES = 12
#: The issue's "taken over within seconds": whatever ``LEASE`` says, a dead node's items are
#: another node's this soon after the kill.
TAKEOVER_WITHIN = 20.0


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, str]]:
    """moto's S3 server in its own process (so it can be frozen), and a fresh bucket."""
    with moto_server(tmp_path, "takeover") as found:
        yield found


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
async def test_queue_taken_over_within_seconds_when_the_holder_dies(
    cluster: dict[str, ClusterNode],
    database: dict[str, Any],
    s3: tuple[subprocess.Popen[bytes], str, str],
) -> None:
    a, b, c = (cluster[n] for n in NAMES)
    assert c.proc is not None
    moto, endpoint, bucket = s3
    dsn = database["dsn"]
    contents = {f"/rep/f{i}.bin": os.urandom(2000 + i) for i in range(FILES)}
    # two workers claim: node-b's own write wakes node-b, node-a's poll takes the rest; node-c is
    # frozen rather than stopped (it could not start again while S3 is frozen)
    os.kill(c.proc.pid, signal.SIGSTOP)
    os.kill(moto.pid, signal.SIGSTOP)  # every replica copy stalls from here
    assert a.proc is not None
    # node-a is frozen while the files go in: its idle poll (every 2 s) would otherwise claim
    # the items queued so far mid-way and stall on the first, leaving later ones unclaimed
    os.kill(a.proc.pid, signal.SIGSTOP)
    try:
        async with aiohttp.ClientSession() as s:
            for path, body in contents.items():
                async with s.put(f"{b.base}/v1/files{path}", data=io.BytesIO(body), headers=H) as r:
                    assert r.status == 201, await r.text()
        os.kill(a.proc.pid, signal.SIGCONT)
        # node-b's worker claims the first item and stalls; node-a's idle poll claims the others
        # and stalls on its first copy
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
        owners = {i: o or "" for i, o, _ in items}
        assert all(o.startswith(("node-a/", "node-b/")) for o in owners.values()), items
        assert any(o.startswith("node-b/") for o in owners.values()), items

        # node-c thaws, idle; live workers stalled on one copy for longer than a lease keep
        # their items (renewals)
        os.kill(c.proc.pid, signal.SIGCONT)
        stalled_until = time.time() + 1.5 * LEASE
        while time.time() < stalled_until:
            items = await queue(dsn)
            now = time.time()
            assert {i: o or "" for i, o, _ in items} == owners, items
            assert all(until > now for _, _, until in items), items
            await asyncio.sleep(0.5)

        a.kill()
        killed_at = time.time()
        items = await queue(dsn)
        a_ids = {i for i, o, _ in items if (o or "").startswith("node-a/")}
        lease_end = min(until for i, _, until in items if i in a_ids)
        # a short lease, renewed while node-a lived
        assert killed_at + LEASE - RENEW_EVERY - 2 < lease_end <= killed_at + LEASE + 1

        # node-a's items: its lease is respected, then node-c takes them over (node-b is busy)
        deadline = time.monotonic() + LEASE + 30
        while True:
            items = await queue(dsn)
            now = time.time()
            assert {i for i, _, _ in items} == set(owners), items  # S3 is frozen: no copy
            current = {i: o or "" for i, o, _ in items}
            if now < lease_end - 1:  # a live lease is never taken over
                assert all(current[i].startswith("node-a/") for i in a_ids), items
            if not any(current[i].startswith("node-a/") for i in a_ids):
                break
            assert time.monotonic() < deadline, items
            await asyncio.sleep(0.2)
        taken_at = time.time()
        print(
            f"node-a's items taken over {taken_at - killed_at:.1f}s after the kill"
            f" (lease {LEASE:.0f}s, idle poll {IDLE_POLL:.0f}s)"
        )
        assert taken_at >= lease_end - 1
        assert taken_at - killed_at < min(LEASE + IDLE_POLL + 5, TAKEOVER_WITHIN)
        assert all(current[i].startswith("node-c/") for i in a_ids), items
        assert all(current[i] == o for i, o in owners.items() if i not in a_ids), items
    finally:
        os.kill(moto.pid, signal.SIGCONT)
        for node in (a, c):
            if node.proc is not None and node.proc.poll() is None:
                os.kill(node.proc.pid, signal.SIGCONT)

    deadline = time.monotonic() + 60
    while await queue(dsn):
        assert time.monotonic() < deadline, await queue(dsn)
        await asyncio.sleep(0.5)
    print(f"queue drained {time.time() - killed_at:.1f}s after the kill (S3 thawed late)")

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **CREDS)
    listed = client.list_objects_v2(Bucket=bucket).get("Contents", [])
    objects = [o["Key"] for o in listed]
    for path, key in (await blob_keys(dsn)).items():
        found = [k for k in objects if k.endswith(key)]
        assert len(found) == 1, (path, key, objects)
        body = client.get_object(Bucket=bucket, Key=found[0])["Body"].read()
        assert body == contents[path]
