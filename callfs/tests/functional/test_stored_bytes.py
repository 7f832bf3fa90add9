"""Bytes per node (issue 17's cluster page): each node counts what its local disk holds (at start,
then in every orphan sweep), ``/metrics`` shows it, and ``GET /v1/status`` carries every node's
own figure, asked over ``/v1/internal/status/stored`` (null when unknown or unreachable)."""

from __future__ import annotations

import io
import os
import socket
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from callfs.daemon import Node
from callfs.storage.base import new_blob_key
from callfs.tests.functional.conftest import INTERNAL, KEY0, auth, make_config
from callfs.tests.functional.test_fsck import blob_path, plant

STATUS_AUTH = {"Authorization": f"Bearer {KEY0}"}


@pytest.fixture
def config_env() -> dict[str, str]:
    return {
        "CALLFS_ERASURE__ENABLED": "true",
        "CALLFS_ERASURE__DATA_SHARDS": "2",
        "CALLFS_ERASURE__PARITY_SHARDS": "1",
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _disk(root: Path, area: str) -> tuple[int, int]:
    """(files, bytes) really under ``area`` of a localfs root."""
    top = {"blobs": root / ".callfs" / "blobs", "replica": root / ".callfs" / "replica"}.get(
        area, root / ".erasure"
    )
    files = [p for p in top.rglob("*") if p.is_file()] if top.exists() else []
    return len(files), sum(p.stat().st_size for p in files)


def _sample(node: Node, name: str, area: str) -> float | None:
    return node.metrics.registry.get_sample_value(name, {"area": area})


async def _status(client: TestClient[Any, Any]) -> dict[str, Any]:
    resp = await client.get("/v1/status", headers=STATUS_AUTH)
    assert resp.status == 200, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


async def test_count_matches_the_disk_and_reaches_metrics_and_status(
    client: TestClient[Any, Any], node: Node, tmp_path: Path
) -> None:
    assert node.fsck is not None
    root = tmp_path / "files"
    sizes = {"/a.bin": 1000, "/b.bin": 70_000, "/dir/c.txt": 1}
    for path, size in sizes.items():
        resp = await client.post(
            f"/v1/files{path}", data=io.BytesIO(os.urandom(size)), headers=auth()
        )
        assert resp.status == 201
    erasure = {**auth(), "X-CallFS-Erasure": "true"}
    resp = await client.post("/v1/files/e.bin", data=io.BytesIO(os.urandom(9000)), headers=erasure)
    assert resp.status == 201

    await node.fsck.count_stored()
    assert _sample(node, "callfs_stored_bytes", "blobs") == sum(sizes.values())
    assert _sample(node, "callfs_stored_files", "blobs") == len(sizes)
    shard_files, shard_bytes = _disk(root, "shards")
    assert shard_files == 3 and shard_bytes > 9000  # 2 data + 1 parity shard, with headers
    assert _sample(node, "callfs_stored_files", "shards") == shard_files
    assert _sample(node, "callfs_stored_bytes", "shards") == shard_bytes
    assert _sample(node, "callfs_stored_bytes", "replica") == 0
    total = sum(sizes.values()) + shard_bytes

    resp = await client.get("/metrics", headers=STATUS_AUTH)
    text = await resp.text()
    assert f'callfs_stored_bytes{{area="blobs"}} {float(sum(sizes.values()))}' in text
    assert 'callfs_stored_files{area="shards"} 3.0' in text

    state = await _status(client)
    (me,) = state["nodes"]
    assert (me["stored_bytes"], me["stored_files"]) == (total, len(sizes) + 3)

    # The orphan sweep refreshes it, without what it removed: a replaced version is gone, an old
    # orphan blob is removed by the sweep itself.
    resp = await client.put("/v1/files/b.bin", data=io.BytesIO(b"short"), headers=auth())
    assert resp.status == 200, await resp.text()
    orphan = plant(blob_path(root, new_blob_key()), b"o" * 4321)
    assert await node.fsck.sweep(600.0) == 1
    assert not orphan.exists()
    files, size = _disk(root, "blobs")
    assert (files, size) == (3, 1000 + 5 + 1)
    assert _sample(node, "callfs_stored_bytes", "blobs") == size
    state = await _status(client)
    assert state["nodes"][0]["stored_bytes"] == size + shard_bytes

    # peers ask over the internal endpoint, which takes the internal secret only
    resp = await client.get("/v1/internal/status/stored", headers=auth())
    assert resp.status == 401
    resp = await client.get(
        "/v1/internal/status/stored", headers={"Authorization": f"Bearer {INTERNAL}"}
    )
    assert await resp.json() == {"stored_bytes": size + shard_bytes, "stored_files": 6}


async def test_status_carries_each_peers_own_figure(
    tmp_path: Path, aiohttp_server: Any, aiohttp_client: Any
) -> None:
    """Node a knows b (up, counted) and c (down): b's figure comes from b, c's is null."""
    port_b = _free_port()
    url_b = f"http://127.0.0.1:{port_b}"
    b = Node(
        make_config(
            tmp_path / "b",
            CALLFS_INSTANCE_DISCOVERY__INSTANCE_ID="b",
            CALLFS_SERVER__EXTERNAL_URL=url_b,
        )
    )
    a = Node(
        make_config(
            tmp_path / "a",
            CALLFS_INSTANCE_DISCOVERY__INSTANCE_ID="a",
            CALLFS_INSTANCE_DISCOVERY__PEER_ENDPOINTS__B=url_b,
            CALLFS_INSTANCE_DISCOVERY__PEER_ENDPOINTS__C=f"http://127.0.0.1:{_free_port()}",
        )
    )
    for n in (a, b):
        n.build()
    await b.start_components()
    await a.start_components()
    try:
        assert b.app is not None and b.fsck is not None
        await aiohttp_server(b.app, port=port_b)
        client_b = await aiohttp_client(b.app)
        for i in range(3):
            data = io.BytesIO(b"x" * (100 * (i + 1)))
            resp = await client_b.post(f"/v1/files/f{i}", data=data, headers=auth())
            assert resp.status == 201
        await b.fsck.count_stored()
        client_a = await aiohttp_client(a.app)
        state = await _status(client_a)
        nodes = {n["id"]: n for n in state["nodes"]}
        assert (nodes["b"]["healthy"], nodes["b"]["stored_bytes"]) == (True, 600)
        assert nodes["b"]["stored_files"] == 3
        assert nodes["c"]["healthy"] is False
        assert (nodes["c"]["stored_bytes"], nodes["c"]["stored_files"]) == (None, None)
    finally:
        await a.stop()
        await b.stop()
