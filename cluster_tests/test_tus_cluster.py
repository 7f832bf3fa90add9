"""Resumable uploads (tus) across two ``callfs server`` processes, sharing a Redis metadata store
or forming a Raft group: an upload lives on the node that created it and is continued through the
other node (relayed with the internal secret; permissions decided on the recorded creator); the
holding node killed with SIGKILL mid-upload and restarted loses nothing acknowledged."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from cluster_tests.harness import API_KEY, OTHER_KEY, ClusterNode, free_ports, node_config
from cluster_tests.raftlib import raft_cluster, wait_leader

pytestmark = pytest.mark.slow
ALICE = {"Authorization": f"Bearer {API_KEY}", "Tus-Resumable": "1.0.0"}
BOB = {"Authorization": f"Bearer {OTHER_KEY}", "Tus-Resumable": "1.0.0"}
OCTET = "application/offset+octet-stream"


def meta(path: str) -> str:
    encoded = base64.b64encode(path.encode()).decode()
    return f"path {encoded},filename {base64.b64encode(b'f').decode()}"


@pytest.fixture(params=["redis", "raft"])
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[list[ClusterNode]]:
    """Two nodes: a shared Redis metadata store and Redis locks, or a 2-member Raft group."""
    prefix = f"callfs-tus-{uuid.uuid4().hex[:12]}:"
    names = ["node-a", "node-b"]
    if request.param == "raft":
        nodes = raft_cluster(tmp_path, names=names)
    else:
        store = {"type": "redis", "redis_addr": "127.0.0.1:6379", "redis_key_prefix": prefix}
        ports = free_ports(len(names))
        peers = {n: f"http://127.0.0.1:{p}" for n, p in zip(names, ports, strict=True)}
        dlm = {"type": "redis", "redis_addr": "127.0.0.1:6379"}
        nodes = [
            ClusterNode(name, port, tmp_path, node_config(name, port, tmp_path, peers, store, dlm))
            for name, port in zip(names, ports, strict=True)
        ]
    try:
        for node in nodes:
            node.start()
        if request.param == "raft":
            wait_leader(nodes)
        yield nodes
    finally:
        for node in nodes:
            node.stop()
        for node in nodes:
            print(f"---- {node.name} log ----\n{node.logs()}")
        if request.param == "redis":
            asyncio.run(_drop_keys(prefix))


async def _drop_keys(prefix: str) -> None:
    r = aioredis.Redis(host="127.0.0.1", port=6379)
    keys = [k async for k in r.scan_iter(match=f"{prefix}*")]
    if keys:
        await r.delete(*keys)
    await r.aclose()


async def patch(
    s: aiohttp.ClientSession, url: str, offset: int, body: bytes, headers: dict[str, str] = ALICE
) -> Any:
    async with s.patch(
        url,
        data=io.BytesIO(body),
        headers={**headers, "Content-Type": OCTET, "Upload-Offset": str(offset)},
    ) as r:
        return r.status, dict(r.headers), await r.read()


async def head(s: aiohttp.ClientSession, url: str, headers: dict[str, str] = ALICE) -> Any:
    async with s.head(url, headers=headers) as r:
        return r.status, dict(r.headers)


def wait_ready(nodes: list[ClusterNode]) -> None:
    """A Raft group has its leader again (a shared store needs nothing)."""
    if "raft" in nodes[0].config:
        wait_leader(nodes)


def staged(tmp_path: Path, name: str) -> list[Path]:
    root = tmp_path / name / "files" / ".callfs" / "uploads"
    return list(root.iterdir()) if root.exists() else []


async def test_tus_upload_through_the_other_node(
    cluster: list[ClusterNode], tmp_path: Path
) -> None:
    a, b = cluster
    data = os.urandom(3 * 1024 * 1024 + 11)
    async with aiohttp.ClientSession() as s:
        async with s.post(
            f"{a.base}/v1/uploads",
            headers={**ALICE, "Upload-Length": str(len(data)), "Upload-Metadata": meta("/t/x.bin")},
        ) as r:
            assert r.status == 201, await r.text()
            location = r.headers["Location"]
        assert len(staged(tmp_path, "node-a")) == 1 and staged(tmp_path, "node-b") == []
        on_a, on_b = a.base + location, b.base + location

        # HEAD and PATCH through node-b land on node-a, which holds the staged bytes
        status, headers = await head(s, on_b)
        assert status == 200, headers
        assert headers["Upload-Offset"] == "0" and headers["Upload-Length"] == str(len(data))
        assert headers["Tus-Resumable"] == "1.0.0" and headers["Cache-Control"] == "no-store"
        status, headers, _ = await patch(s, on_b, 0, data[:1_000_000])
        assert status == 204 and headers["Upload-Offset"] == "1000000"
        checksum = "sha1 " + base64.b64encode(hashlib.sha1(b"nope").digest()).decode()
        status, _, body = await patch(
            s, on_b, 1_000_000, data[1_000_000:1_000_100], {**ALICE, "Upload-Checksum": checksum}
        )
        assert status == 460, body
        status, _, _ = await patch(s, on_b, 5, b"zz")
        assert status == 409
        # a POST with X-HTTP-Method-Override is that method, through the other node too
        override = {**ALICE, "X-HTTP-Method-Override": "HEAD"}
        async with s.post(on_b, headers=override) as r:
            assert r.status == 200, await r.text()
            assert r.headers["Upload-Offset"] == "1000000"
        override = {**ALICE, "X-HTTP-Method-Override": "PATCH", "Content-Type": OCTET}
        async with s.post(on_b, data=b"", headers={**override, "Upload-Offset": "1000000"}) as r:
            assert r.status == 204, await r.text()
        async with s.post(on_b, headers={**ALICE, "X-HTTP-Method-Override": "PUT"}) as r:
            assert r.status == 405
            assert set(r.headers["Allow"].replace(" ", "").split(",")) == {
                "DELETE",
                "HEAD",
                "OPTIONS",
                "PATCH",
            }
        # another user is refused through either node; the creator's view is unchanged
        assert (await head(s, on_b, BOB))[0] == 403
        assert (await patch(s, on_b, 1_000_000, b"x", BOB))[0] == 403
        assert (await head(s, on_a))[1]["Upload-Offset"] == "1000000"

        # node-a killed mid-upload: node-b answers 502; after a restart the upload resumes
        a.kill()
        assert (await head(s, on_b))[0] == 502
        a.start()
        await asyncio.to_thread(wait_ready, cluster)
        status, headers = await head(s, on_b)
        assert status == 200 and headers["Upload-Offset"] == "1000000"
        status, headers, _ = await patch(s, on_b, 1_000_000, data[1_000_000:])
        assert status == 204 and headers["Upload-Offset"] == str(len(data))

        for node in (a, b):
            async with s.get(f"{node.base}/v1/files/t/x.bin", headers=ALICE) as r:
                assert r.status == 200
                assert hashlib.sha256(await r.read()).digest() == hashlib.sha256(data).digest()
                assert r.headers["X-CallFS-Owner"] == "alice"
            async with s.head(f"{node.base}/v1/files/t/x.bin", headers=ALICE) as r:
                assert r.headers["X-CallFS-Instance-ID"] == "node-a"

        # an upload created on node-b over node-a's file replaces it on node-a (proxied PUT)
        async with s.post(
            f"{b.base}/v1/uploads",
            headers={**ALICE, "Upload-Length": "5", "Upload-Metadata": meta("/t/x.bin")},
        ) as r:
            assert r.status == 201
            second = r.headers["Location"]
        status, _, body = await patch(s, a.base + second, 0, b"hello")
        assert status == 204, body
        async with s.get(f"{b.base}/v1/files/t/x.bin", headers=ALICE) as r:
            assert await r.read() == b"hello"

        # termination through the other node removes the staged bytes on the owner
        async with s.post(
            f"{a.base}/v1/uploads",
            headers={**ALICE, "Upload-Length": "10", "Upload-Metadata": meta("/t/gone.bin")},
        ) as r:
            third = r.headers["Location"]
        assert (await patch(s, b.base + third, 0, b"12345"))[0] == 204
        async with s.delete(b.base + third, headers=BOB) as r:
            assert r.status == 403
        async with s.delete(b.base + third, headers=ALICE) as r:
            assert r.status == 204
        assert (await head(s, a.base + third))[0] == 404
        assert not any((p / "data.part").exists() for p in staged(tmp_path, "node-a"))
