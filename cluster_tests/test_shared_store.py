"""Three ``callfs server`` processes sharing one metadata store (PostgreSQL or Redis) and Redis
locks serve one namespace (issue 4): read-your-writes on every node, byte proxying to the owner,
cross-server conflicts, and concurrent PUTs through different nodes."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis

from cluster_tests.harness import API_KEY, OTHER_KEY, ClusterNode, free_ports, node_config

pytestmark = pytest.mark.slow
H = {"Authorization": f"Bearer {API_KEY}"}
PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


@pytest.fixture
async def store_settings(request: pytest.FixtureRequest) -> AsyncIterator[dict[str, Any]]:
    kind = request.param
    tag = uuid.uuid4().hex[:12]
    if kind == "postgres":
        db = f"callfs_cluster_{tag}"
        conn = await asyncpg.connect(PG_ADMIN_DSN)
        await conn.execute(f'CREATE DATABASE "{db}"')
        await conn.close()
        try:
            yield {"type": "postgres", "dsn": f"postgresql://postgres@127.0.0.1:5432/{db}"}
        finally:
            conn = await asyncpg.connect(PG_ADMIN_DSN)
            await conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
            await conn.close()
    else:
        prefix = f"callfs-cluster-{tag}:"
        try:
            yield {"type": "redis", "redis_addr": "127.0.0.1:6379", "redis_key_prefix": prefix}
        finally:
            r = aioredis.Redis(host="127.0.0.1", port=6379)
            keys = [k async for k in r.scan_iter(match=f"{prefix}*")]
            if keys:
                await r.delete(*keys)
            await r.aclose()


@pytest.fixture
def cluster(tmp_path: Path, store_settings: dict[str, Any]) -> Iterator[list[ClusterNode]]:
    names = ["node-a", "node-b", "node-c"]
    ports = free_ports(len(names))
    peers = {n: f"http://127.0.0.1:{p}" for n, p in zip(names, ports, strict=True)}
    nodes = [
        ClusterNode(
            name,
            port,
            tmp_path,
            node_config(
                name,
                port,
                tmp_path,
                peers,
                store_settings,
                {"type": "redis", "redis_addr": "127.0.0.1:6379"},
            ),
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


@pytest.mark.parametrize("store_settings", ["postgres", "redis"], indirect=True)
async def test_one_namespace_across_nodes(cluster: list[ClusterNode], tmp_path: Path) -> None:
    a, b, c = cluster
    blob = os.urandom(2 * 1024 * 1024 + 3)
    async with aiohttp.ClientSession() as s:
        async with s.put(
            f"{a.base}/v1/files/shared/blob.bin", data=io.BytesIO(blob), headers=H
        ) as r:
            assert r.status == 201
        # read-your-writes on every node, bytes proxied from the owner
        for node in (b, c):
            async with s.get(f"{node.base}/v1/files/shared/blob.bin", headers=H) as r:
                assert r.status == 200
                got = await r.read()
                assert hashlib.sha256(got).digest() == hashlib.sha256(blob).digest()
                assert r.headers["X-CallFS-Owner"] == "alice"
            async with s.get(
                f"{node.base}/v1/files/shared/blob.bin", headers={**H, "Range": "bytes=10-19"}
            ) as r:
                assert r.status == 206
                assert await r.read() == blob[10:20]
                assert r.headers["Content-Range"] == f"bytes 10-19/{len(blob)}"
            async with s.head(f"{node.base}/v1/files/shared/blob.bin", headers=H) as r:
                assert r.status == 200
                assert r.headers["X-CallFS-Instance-ID"] == "node-a"
                assert r.headers["X-CallFS-Size"] == str(len(blob))
            async with s.get(f"{node.base}/v1/directories/shared", headers=H) as r:
                assert [i["name"] for i in (await r.json())["items"]] == ["blob.bin"]

        # only node-a holds the bytes
        def blobs(name: str) -> list[str]:
            return [p.name for p in (tmp_path / name / "files").rglob("*") if p.is_file()]

        assert len(blobs("node-a")) == 1
        assert blobs("node-b") == [] and blobs("node-c") == []

        # create conflict in the cross-server shape
        async with s.post(f"{b.base}/v1/files/shared/blob.bin", data=b"x", headers=H) as r:
            assert r.status == 409
            assert await r.json() == {
                "error": "Resource exists on another server",
                "existing_path": "/shared/blob.bin",
                "instance_id": "node-a",
                "backend_type": "localfs",
                "suggestion": "File already exists on another server. Use PUT to update it.",
                "update_url": f"{a.base}/v1/files/shared/blob.bin",
            }
        # an update through another node lands on the owner
        async with s.put(f"{c.base}/v1/files/shared/blob.bin", data=b"v2", headers=H) as r:
            assert r.status == 200
        stored = [p for p in (tmp_path / "node-a" / "files").rglob("*") if p.is_file()]
        assert [p.read_bytes() for p in stored] == [b"v2"]  # the old version's blob is gone
        # permissions are decided by the receiving node before proxying
        bob = {"Authorization": f"Bearer {OTHER_KEY}"}
        async with s.put(f"{b.base}/v1/files/shared/blob.bin", data=b"no", headers=bob) as r:
            assert r.status == 403
        # link generated on one node, redeemed on another
        async with s.post(
            f"{b.base}/v1/links/generate",
            json={"path": "/shared/blob.bin", "expiry_seconds": 60},
            headers=H,
        ) as r:
            token = (await r.json())["token"]
        async with s.get(f"{c.base}/download/{token}") as r:
            assert r.status == 200
            assert await r.read() == b"v2"
        async with s.get(f"{a.base}/download/{token}") as r:
            assert r.status == 410
        # a rename through a non-owner: the JSON body the receiving node read is forwarded
        started = asyncio.get_running_loop().time()
        async with s.patch(
            f"{b.base}/v1/files/shared/blob.bin", json={"name": "renamed.bin"}, headers=H
        ) as r:
            assert r.status == 200, await r.text()
            assert await r.json() == {"path": "/shared/renamed.bin"}
        assert asyncio.get_running_loop().time() - started < 5
        async with s.patch(
            f"{c.base}/v1/files/shared/renamed.bin", json={"name": "blob.bin"}, headers=H
        ) as r:
            assert r.status == 200
        # delete through a non-owner
        async with s.delete(f"{b.base}/v1/files/shared/blob.bin", headers=H) as r:
            assert r.status == 204
        assert blobs("node-a") == []
        for node in cluster:
            async with s.get(f"{node.base}/v1/files/shared/blob.bin", headers=H) as r:
                assert r.status == 404


@pytest.mark.parametrize("store_settings", ["postgres", "redis"], indirect=True)
async def test_concurrent_writes_through_different_nodes(cluster: list[ClusterNode]) -> None:
    bodies = [bytes([i]) * 300_000 for i in range(9)]
    async with aiohttp.ClientSession() as s:

        async def put(i: int) -> int:
            node = cluster[i % len(cluster)]
            url = f"{node.base}/v1/files/race/one.bin"
            async with s.put(url, data=io.BytesIO(bodies[i]), headers=H) as r:
                return r.status

        statuses = await asyncio.gather(*(put(i) for i in range(len(bodies))))
        assert all(st in (200, 201) for st in statuses), statuses
        assert statuses.count(201) == 1
        seen = set()
        for node in cluster:
            async with s.get(f"{node.base}/v1/files/race/one.bin", headers=H) as r:
                assert r.status == 200
                seen.add(await r.read())
        assert len(seen) == 1
        assert seen.pop() in bodies

        async def post(i: int) -> int:
            node = cluster[i % len(cluster)]
            async with s.post(f"{node.base}/v1/files/race/two.txt", data=b"x", headers=H) as r:
                return r.status

        statuses = await asyncio.gather(*(post(i) for i in range(9)))
        assert sorted(statuses) == [201] + [409] * 8


@pytest.mark.parametrize("store_settings", ["postgres"], indirect=True)
async def test_transfers_through_a_non_owner_keep_the_caller_and_the_owners_answers(
    cluster: list[ClusterNode], tmp_path: Path
) -> None:
    """Found by review, each through a node that does not own the file: a WebSocket upload whose
    file was deleted meanwhile was created on the owner as ``internal-proxy``'s (the caller was
    locked out of it); a file under ``/ws/`` could not be read (its link was used up on a 502);
    an upload too large closed 1011 instead of 1009; an owner's 500 became a 502."""
    a, b, _c = cluster
    async with aiohttp.ClientSession() as s:
        # a file under /ws/: a link redeemed and a WebSocket download, both through node-b
        async with s.put(f"{a.base}/v1/files/ws/x.txt", data=b"in ws", headers=H) as r:
            assert r.status == 201
        async with s.post(
            f"{b.base}/v1/links/generate",
            json={"path": "/ws/x.txt", "expiry_seconds": 60},
            headers=H,
        ) as r:
            token = (await r.json())["token"]
        async with s.get(f"{b.base}/download/{token}") as r:
            assert (r.status, await r.read()) == (200, b"in ws")
        async with s.ws_connect(f"{b.base}/v1/files/ws/ws/x.txt", headers=H) as ws:
            got = b""
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.BINARY:
                    got += msg.data
            assert (got, ws.close_code) == (b"in ws", 1000)

        # a WebSocket upload through node-b of node-a's file, deleted on node-a meanwhile
        async with s.put(f"{a.base}/v1/files/race/f", data=b"old", headers=H) as r:
            assert r.status == 201
        url = f"{b.base}/v1/files/ws/race/f?mode=upload"
        async with s.ws_connect(url, headers=H) as ws:
            await ws.send_bytes(b"new ")
            await asyncio.sleep(0.3)  # the frames stream to the owner already
            async with s.delete(f"{a.base}/v1/files/race/f", headers=H) as r:
                assert r.status == 204
            await ws.send_bytes(b"bytes")
            await ws.send_str("EOF")
            msg = await ws.receive()
            assert msg.type == aiohttp.WSMsgType.TEXT, msg
            assert msg.data == "ok:9"
        async with s.head(f"{b.base}/v1/files/race/f", headers=H) as r:
            assert r.status == 200
            assert r.headers["X-CallFS-Owner"] == "alice"
        async with s.get(f"{b.base}/v1/files/race/f", headers=H) as r:
            assert await r.read() == b"new bytes"
        async with s.delete(f"{b.base}/v1/files/race/f", headers=H) as r:
            assert r.status == 204

        # an upload over the 100 MiB cap through node-b, of node-a's file: 1009, nothing stored
        async with s.put(f"{a.base}/v1/files/big/f", data=b"small", headers=H) as r:
            assert r.status == 201
        async with s.ws_connect(
            f"{b.base}/v1/files/ws/big/f?mode=upload", headers=H, max_msg_size=0
        ) as ws:
            block = b"\0" * (1 << 20)
            with contextlib.suppress(ConnectionError):
                for _ in range(101):
                    await ws.send_bytes(block)
            msg = await ws.receive()
            assert msg.type == aiohttp.WSMsgType.CLOSE, msg
            assert (msg.data, msg.extra) == (1009, "upload too large")
        async with s.get(f"{b.base}/v1/files/big/f", headers=H) as r:
            assert await r.read() == b"small"

        # the owner's own error answer is relayed, not turned into "unreachable"
        async with s.put(f"{a.base}/v1/files/err/e", data=b"e", headers=H) as r:
            assert r.status == 201
        (blob,) = [
            p
            for p in (tmp_path / "node-a" / "files").rglob("*")
            if p.is_file() and p.read_bytes() == b"e"
        ]
        blob.unlink()
        blob.symlink_to("/etc/hostname")  # localfs refuses to follow it: a 500 on the owner
        for node in (a, b):
            async with s.get(f"{node.base}/v1/files/err/e", headers=H) as r:
                assert r.status == 500, node.name
                assert (await r.json())["code"] == "INTERNAL_ERROR"

    # an owner that does not answer in time (frozen): 502 PEER_UNAVAILABLE (§12.3), as for
    # writes, not the 503 of a local backend's timeout
    b.stop()
    b.config["server"]["file_op_timeout"] = "1s"
    b.start()
    assert a.proc is not None
    a.proc.send_signal(signal.SIGSTOP)
    try:
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"{b.base}/v1/files/big/f", headers=H) as r,
        ):
            assert r.status == 502, await r.text()
            assert (await r.json())["code"] == "PEER_UNAVAILABLE"
    finally:
        a.proc.send_signal(signal.SIGCONT)
