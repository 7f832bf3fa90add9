"""Recursive delete of a tree whose files three nodes own (issue 14), on real ``callfs server``
processes sharing a private PostgreSQL database and Redis locks (under a private key prefix).

What the code does (``Engine.delete``): the request goes to the node that owns the tree's top
directory; there ONE ``delete_tree`` command checks every entry's owner and removes the whole
subtree's metadata at once (all or nothing). That node then removes its own blobs; the blobs of
the other owners are unreferenced from that moment and each owner's orphan sweep reclaims them.
So:

- every owner up: gone from every node's view at once; the top's owner frees its bytes now, the
  others' bytes go with their sweep;
- an owner of files below the top down: the same (the metadata does not need it); its bytes stay
  on its disk until it is back and sweeps, and no orphan remains after that;
- the top directory's owner down: 502 ``PEER_UNAVAILABLE`` and nothing is deleted;
- a file of another user anywhere in the tree: 403 and nothing is deleted.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cluster_tests.harness import (
    API_KEY,
    INTERNAL,
    OTHER_KEY,
    ClusterNode,
    private_pg_database,
    redis_locks,
    shared_store_nodes,
)

pytestmark = pytest.mark.slow
ALICE = {"Authorization": f"Bearer {API_KEY}"}
BOB = {"Authorization": f"Bearer {OTHER_KEY}"}
INTERNAL_AUTH = {"Authorization": f"Bearer {INTERNAL}"}
NAMES = ["node-a", "node-b", "node-c"]


@pytest.fixture
async def database() -> AsyncIterator[dict[str, Any]]:
    async with private_pg_database("treedel") as store:
        yield store


@pytest.fixture
def cluster(tmp_path: Path, database: dict[str, Any]) -> Iterator[dict[str, ClusterNode]]:
    nodes = shared_store_nodes(NAMES, tmp_path, database, redis_locks("treedel"))
    try:
        for node in nodes.values():
            node.start()
        yield nodes
    finally:
        for node in nodes.values():
            node.stop()
        for node in nodes.values():
            print(f"---- {node.name} log ----\n{node.logs()}")


def blobs(tmp_path: Path, name: str) -> set[Path]:
    root = tmp_path / name / "files" / ".callfs" / "blobs"
    return {p for p in root.rglob("*") if p.is_file()} if root.exists() else set()


async def put(
    s: aiohttp.ClientSession, node: ClusterNode, path: str, body: bytes, who: dict[str, str] = ALICE
) -> None:
    async with s.put(f"{node.base}/v1/files{path}", data=io.BytesIO(body), headers=who) as r:
        assert r.status in (200, 201), (path, r.status, await r.text())


async def status(s: aiohttp.ClientSession, node: ClusterNode, path: str) -> int:
    async with s.get(f"{node.base}/v1/files{path}", headers=ALICE) as r:
        await r.read()
        return r.status


async def make_tree(
    s: aiohttp.ClientSession, cluster: dict[str, ClusterNode], top: str
) -> dict[str, bytes]:
    """``top`` (and its first subdirectory) created through node-a, then files through each of
    the three nodes: every node owns two files of the tree."""
    a, b, c = (cluster[n] for n in NAMES)
    contents: dict[str, bytes] = {}
    for i, node in enumerate((a, b, c, a, b, c)):
        path = f"{top}/s{i % 2}/deep/f{i}.bin"
        contents[path] = f"{node.name} {i}".encode() * 100
        await put(s, node, path, contents[path])
    return contents


async def sweep(s: aiohttp.ClientSession, node: ClusterNode) -> None:
    """The periodic orphan sweep's pass, run now with grace 0."""
    body = {"repair": True, "grace": 0, "shared": True}
    async with s.post(f"{node.base}/v1/internal/fsck/local", json=body, headers=INTERNAL_AUTH) as r:
        assert r.status == 200, await r.text()


async def fsck_counts(s: aiohttp.ClientSession, node: ClusterNode) -> dict[str, int]:
    body = {"repair": False, "grace": 0}
    async with s.post(f"{node.base}/v1/internal/fsck", json=body, headers=INTERNAL_AUTH) as r:
        assert r.status == 200, await r.text()
        report = await r.json()
    assert not report.get("errors"), report
    counts: dict[str, int] = report["counts"]
    return counts


async def test_tree_of_three_owners_deleted_through_one_node(
    cluster: dict[str, ClusterNode], tmp_path: Path
) -> None:
    a, b, c = (cluster[n] for n in NAMES)
    async with aiohttp.ClientSession() as s:
        contents = await make_tree(s, cluster, "/t")
        held = {n: blobs(tmp_path, n) for n in NAMES}
        assert {n: len(v) for n, v in held.items()} == {n: 2 for n in NAMES}
        # through node-b, which owns files of the tree but not its top (node-a does)
        async with s.delete(f"{b.base}/v1/files/t?recursive=true", headers=ALICE) as r:
            assert r.status == 204, await r.text()
        for node in (a, b, c):
            assert await status(s, node, "/t/") == 404
            for path in contents:
                assert await status(s, node, path) == 404
        # the top's owner freed its bytes at once; the others' wait for their own sweep
        assert blobs(tmp_path, "node-a") == set()
        assert blobs(tmp_path, "node-b") == held["node-b"]
        assert blobs(tmp_path, "node-c") == held["node-c"]
        assert (await fsck_counts(s, a))["orphan"] == 4
        for node in (b, c):
            await sweep(s, node)
        assert {n: blobs(tmp_path, n) for n in NAMES} == {n: set() for n in NAMES}
        assert await fsck_counts(s, c) == {
            "orphan": 0,
            "missing": 0,
            "size-mismatch": 0,
            "stale-temp": 0,
        }


async def test_tree_delete_with_an_owner_down(
    cluster: dict[str, ClusterNode], tmp_path: Path
) -> None:
    a, b, c = (cluster[n] for n in NAMES)
    async with aiohttp.ClientSession() as s:
        contents = await make_tree(s, cluster, "/t")
        held_c = blobs(tmp_path, "node-c")
        assert len(held_c) == 2

        # the owner of the top directory down: 502, nothing deleted
        a.kill()
        async with s.delete(f"{b.base}/v1/files/t?recursive=true", headers=ALICE) as r:
            assert r.status == 502, await r.text()
            assert (await r.json())["code"] == "PEER_UNAVAILABLE"
        a.start()
        for node in (a, b, c):
            for path, data in contents.items():
                async with s.get(f"{node.base}/v1/files{path}", headers=ALICE) as r:
                    assert r.status == 200, (node.name, path)
                    assert await r.read() == data

        # an owner of files below the top down: the metadata goes in one command without it
        c.kill()
        async with s.delete(f"{b.base}/v1/files/t?recursive=true", headers=ALICE) as r:
            assert r.status == 204, await r.text()
        for node in (a, b):
            assert await status(s, node, "/t/") == 404
            for path in contents:
                assert await status(s, node, path) == 404
        assert blobs(tmp_path, "node-a") == set()
        assert blobs(tmp_path, "node-c") == held_c  # left on the down node's disk
        c.start()
        assert await status(s, c, "/t/") == 404
        assert (await fsck_counts(s, a))["orphan"] == 4  # node-b's two and node-c's two
        for node in (b, c):
            await sweep(s, node)
        assert {n: blobs(tmp_path, n) for n in NAMES} == {n: set() for n in NAMES}
        assert (await fsck_counts(s, b))["orphan"] == 0


async def test_tree_delete_with_another_users_file_is_refused(
    cluster: dict[str, ClusterNode], tmp_path: Path
) -> None:
    a, b, c = (cluster[n] for n in NAMES)
    async with aiohttp.ClientSession() as s:
        contents = await make_tree(s, cluster, "/p")
        # bob may create a file in alice's directory (anyone may create children in one)
        await put(s, c, "/p/s1/deep/bob.txt", b"bob's", BOB)
        held = {n: blobs(tmp_path, n) for n in NAMES}
        for node in (a, b, c):
            async with s.delete(f"{node.base}/v1/files/p?recursive=true", headers=ALICE) as r:
                assert r.status == 403, await r.text()
        for node in (a, b, c):
            for path, data in contents.items():
                async with s.get(f"{node.base}/v1/files{path}", headers=ALICE) as r:
                    assert r.status == 200, (node.name, path)
                    assert await r.read() == data
            assert await status(s, node, "/p/s1/deep/bob.txt") == 200
        assert {n: blobs(tmp_path, n) for n in NAMES} == held
        # bob's file gone, alice's tree deletes
        async with s.delete(f"{a.base}/v1/files/p/s1/deep/bob.txt", headers=BOB) as r:
            assert r.status == 204, await r.text()
        async with s.delete(f"{c.base}/v1/files/p?recursive=true", headers=ALICE) as r:
            assert r.status == 204, await r.text()
        for path in contents:
            assert await status(s, b, path) == 404


async def test_raft_tree_of_three_owners_deleted_through_one_node(tmp_path: Path) -> None:
    """The same on a three-node Raft cluster (no external store): one ``delete_tree`` command
    through the log, the top's owner frees its bytes, the others' sweeps theirs; fsck clean."""
    from cluster_tests.raftlib import raft_cluster, wait_leader

    nodes = raft_cluster(tmp_path, names=NAMES)
    cluster = {node.name: node for node in nodes}
    a, b, c = nodes
    try:
        for node in nodes:
            node.start()
        wait_leader(nodes)
        async with aiohttp.ClientSession() as s:
            contents = await make_tree(s, cluster, "/t")
            held = {n: blobs(tmp_path, n) for n in NAMES}
            assert {n: len(v) for n, v in held.items()} == {n: 2 for n in NAMES}
            async with s.delete(f"{c.base}/v1/files/t?recursive=true", headers=ALICE) as r:
                assert r.status == 204, await r.text()
            for node in nodes:
                assert await status(s, node, "/t/") == 404
                for path in contents:
                    assert await status(s, node, path) == 404
            assert blobs(tmp_path, "node-a") == set()
            assert (await fsck_counts(s, b))["orphan"] == 4
            for node in (b, c):
                await sweep(s, node)
            assert {n: blobs(tmp_path, n) for n in NAMES} == {n: set() for n in NAMES}
            assert sum((await fsck_counts(s, a)).values()) == 0
    finally:
        for node in nodes:
            node.stop()
