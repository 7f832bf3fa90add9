"""Moves between nodes on one node (issue 14): the internal blob endpoint a target receives bytes
on, the PATCH checks (unknown instance, target down: nothing changes), the drain/rebalance job
endpoints, and the planners. Real processes moving files: ``cluster_tests/test_node_moves.py``."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from callfs.core.peer import EXPECT_BLOB
from callfs.core.placement_ops import plan_drain, plan_rebalance
from callfs.daemon import Node
from callfs.errors import VersionMoved
from callfs.model import BackendType, Entry, EntryType
from callfs.tests.functional.conftest import BOB_KEY, INTERNAL, auth, unreferenced_files

SECRET = {"Authorization": f"Bearer {INTERNAL}"}


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def config_env() -> dict[str, str]:
    return {
        "CALLFS_INSTANCE_DISCOVERY__INSTANCE_ID": "a",
        "CALLFS_INSTANCE_DISCOVERY__PEER_ENDPOINTS__B": f"http://127.0.0.1:{_dead_port()}",
    }


def _file(path: str, size: int, node: str) -> Entry:
    return Entry(
        path=path,
        type=EntryType.FILE,
        size=size,
        owner="alice",
        mtime=0,
        backend_type=BackendType.LOCALFS,
        instance_id=node,
        created_at=0,
        blob_key=path.strip("/"),
    )


def test_plan_drain_sends_each_file_to_the_node_with_fewest_bytes() -> None:
    files = [_file(f"/c{i}", size, "c") for i, size in enumerate((50, 40, 30, 20, 10))]
    files.append(_file("/a0", 60, "a"))
    moves = plan_drain("c", files, ["a", "b"])
    assert [(e.path, t) for e, t in moves] == [
        ("/c0", "b"),
        ("/c1", "b"),
        ("/c2", "a"),
        ("/c3", "a"),  # a tie (90 each): the first name
        ("/c4", "b"),
    ]


def test_plan_rebalance_evens_out_within_the_tolerance() -> None:
    files = [_file(f"/a{i}", 100 + i, "a") for i in range(30)]
    files += [_file(f"/b{i}", 100, "b") for i in range(10)]
    moves = plan_rebalance(files, ["a", "b", "c"], 0.1)
    load = {"a": 0, "b": 0, "c": 0}
    for entry in files:
        load[str(entry.instance_id)] += entry.size
    for entry, target in moves:
        load[str(entry.instance_id)] -= entry.size
        load[target] += entry.size
    mean = sum(load.values()) / 3
    assert all(abs(v - mean) <= 0.1 * mean for v in load.values()), load
    assert plan_rebalance(files, ["a"], 0.1) == []
    assert plan_rebalance([], ["a", "b"], 0.1) == []


async def test_blob_endpoint_stores_checks_the_size_and_drops_only_unnamed_blobs(
    node: Node, client: TestClient[Any, Any]
) -> None:
    assert (await client.post("/v1/internal/blobs?size=3", data=b"abc")).status == 401
    resp = await client.post("/v1/internal/blobs?size=3", data=b"abc", headers=auth())
    assert resp.status == 401  # API keys are not accepted
    resp = await client.post("/v1/internal/blobs?size=4", data=b"abc", headers=SECRET)
    assert resp.status == 400 and "expected 4 bytes" in (await resp.json())["error"]
    for size in ("9" * 5000, "+3", "-3"):  # 5,000 digits made int() raise: a 500
        resp = await client.post(f"/v1/internal/blobs?size={size}", data=b"abc", headers=SECRET)
        assert resp.status == 400, size
    assert await unreferenced_files(node) == []  # the short upload left nothing
    resp = await client.post("/v1/internal/blobs?size=3", data=b"abc", headers=SECRET)
    assert resp.status == 201
    key = (await resp.json())["key"]
    assert len(await unreferenced_files(node)) == 1  # an orphan until a commit names it
    assert (await client.delete(f"/v1/internal/blobs/{key}", headers=SECRET)).status == 204
    assert await unreferenced_files(node) == []
    # a blob an entry names is never removed this way
    assert (await client.put("/v1/files/x.txt", data=b"keep", headers=auth())).status == 201
    assert node.meta is not None
    named = await node.meta.get("/x.txt")
    assert named is not None
    resp = await client.delete(f"/v1/internal/blobs/{named.blob_key}", headers=SECRET)
    assert resp.status == 409
    assert await (await client.get("/v1/files/x.txt", headers=auth())).read() == b"keep"


async def test_patch_instance_checks_and_a_target_down(
    node: Node, client: TestClient[Any, Any]
) -> None:
    assert (await client.put("/v1/files/d/f.txt", data=b"data", headers=auth())).status == 201
    assert node.meta is not None
    before = await node.meta.get("/d/f.txt")
    resp = await client.patch(
        "/v1/files/d/f.txt", json={"name": "f.txt", "instance": "nope"}, headers=auth()
    )
    assert resp.status == 400 and (await resp.json())["message"] == "unknown instance"
    for path, name in (("/v1/files/d/f.txt", "f.txt"), ("/v1/files/d", "d")):
        resp = await client.patch(path, json={"name": name, "instance": "b"}, headers=auth())
        assert resp.status == 502, await resp.text()
        assert (await resp.json())["code"] == "PEER_UNAVAILABLE"
    assert await node.meta.get("/d/f.txt") == before
    assert await unreferenced_files(node) == []
    # to itself: nothing would change, for a file or a whole directory: §9.7 step 5, 400 (a
    # directory answered 200 with nothing moved; found by an audit)
    for path, name in (("/v1/files/d/f.txt", "f.txt"), ("/v1/files/d", "d")):
        resp = await client.patch(path, json={"name": name, "instance": "a"}, headers=auth())
        assert resp.status == 400
        assert (await resp.json())["message"] == "destination equals source"
    assert await node.meta.get("/d/f.txt") == before
    # bob may not move alice's files: nothing moves
    resp = await client.patch(
        "/v1/files/d",
        json={"name": "d", "instance": "a"},
        headers=auth("bob-key-0123456789abcdef000"),
    )
    assert resp.status == 403


async def test_job_endpoints(node: Node, client: TestClient[Any, Any]) -> None:
    assert (await client.get("/v1/internal/nodes/job")).status == 401
    assert (await client.get("/v1/internal/nodes/job", headers=SECRET)).status == 404
    resp = await client.post("/v1/internal/nodes/drain", json={"node": "zz"}, headers=SECRET)
    assert resp.status == 400 and "unknown node" in (await resp.json())["error"]
    resp = await client.post("/v1/internal/nodes/drain", json={}, headers=SECRET)
    assert resp.status == 400
    resp = await client.post("/v1/internal/nodes/rebalance", json={"tolerance": 2}, headers=SECRET)
    assert resp.status == 400
    # b is down and holds no file, only a directory: the drain re-tags it to this node
    assert node.meta is not None
    made = await node.meta.create(
        Entry("/made-by-b", EntryType.DIRECTORY, 0, "alice", 0, BackendType.LOCALFS, "b")
    )
    resp = await client.post("/v1/internal/nodes/drain", json={"node": "b"}, headers=SECRET)
    assert resp.status == 202, await resp.text()
    for _ in range(100):
        job = await (await client.get("/v1/internal/nodes/job", headers=SECRET)).json()
        if job["state"] not in ("planning", "running"):
            break
        await asyncio.sleep(0.05)
    assert job["state"] == "done" and job["files_total"] == 0, job
    assert (job["dirs_moved"], job["dirs_failed"]) == (1, 0), job
    retagged = await node.meta.get("/made-by-b")
    assert retagged is not None and retagged.instance_id == "a"
    assert retagged.version == made.version + 1 and retagged.blob_key is None
    # a rebalance with one live node has nothing to do either
    resp = await client.post("/v1/internal/nodes/rebalance", json={}, headers=SECRET)
    assert resp.status == 202
    for _ in range(100):
        job = await (await client.get("/v1/internal/nodes/job", headers=SECRET)).json()
        if job["state"] not in ("planning", "running"):
            break
        await asyncio.sleep(0.05)
    assert job["kind"] == "rebalance" and job["state"] == "done", job
    assert Path(node.cfg.backend.localfs_root_path).exists()


async def test_an_owner_refuses_a_read_of_a_version_it_has_replaced(
    client: TestClient[Any, Any], node: Node
) -> None:
    """A node relaying a GET to the file's owner names the version it looked up; the owner
    answers 412 when its current version is another one, so the relaying node never sends one
    version's headers and range over another's bytes. Only the internal secret may ask."""
    assert (await client.put("/v1/files/v.bin", data=b"first", headers=auth())).status == 201
    engine = node.engine
    assert engine is not None
    first = await engine.find("/v.bin")
    assert first is not None and first.blob_key is not None
    assert (await client.put("/v1/files/v.bin", data=b"second!", headers=auth())).status == 200
    stale = {**SECRET, EXPECT_BLOB: first.blob_key}
    resp = await client.get("/v1/files/v.bin", headers=stale)
    assert resp.status == 412
    assert (await resp.json())["code"] == "PRECONDITION_FAILED"
    # decided before the range: a range past the new (shorter) version is 412 too, not 416
    resp = await client.get("/v1/files/v.bin", headers={**stale, "Range": "bytes=-100"})
    assert resp.status == 412
    resp = await client.get("/v1/files/v.bin", headers={**stale, "Range": "bytes=100-"})
    assert resp.status == 412
    current = await engine.find("/v.bin")
    assert current is not None and current.blob_key is not None
    resp = await client.get("/v1/files/v.bin", headers={**SECRET, EXPECT_BLOB: current.blob_key})
    assert resp.status == 200 and await resp.read() == b"second!"
    # a client's own header is no precondition (the blob key is not part of the public API)
    resp = await client.get("/v1/files/v.bin", headers={**auth(), EXPECT_BLOB: first.blob_key})
    assert resp.status == 200 and await resp.read() == b"second!"
    # a file that became a directory: 412, never the listing relayed as the file's bytes
    assert (await client.delete("/v1/files/v.bin", headers=auth())).status == 204
    assert (await client.post("/v1/files/v.bin/", headers=auth())).status == 201
    resp = await client.get("/v1/files/v.bin", headers=stale)
    assert resp.status == 412


class _Relayed:
    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    async def __aiter__(self) -> Any:
        yield self.body

    async def aclose(self) -> None:
        return None


async def test_a_relayed_read_of_a_replaced_version_is_answered_with_the_current_one(
    client: TestClient[Any, Any], node: Node
) -> None:
    """This node (a) relays a GET of a file node b owns; b replaced it after a looked it up (b
    answers 412, as above): a looks it up again and relays the current version, with its
    headers and its range."""
    engine = node.engine
    assert engine is not None
    old = replace(_file("/r.bin", 100_000, "b"), blob_key="k-old")
    new = replace(old, size=10, blob_key="k-new", mtime=7)
    await engine._meta.create(old)
    asked: list[str | None] = []

    class Owner:
        async def open_read(
            self, instance_id: str, path: str, offset: int, length: Any, blob: Any
        ) -> Any:
            asked.append(blob)
            if blob == "k-old":  # b has replaced it meanwhile
                await engine._meta.update(new, old.version)
                raise VersionMoved()
            return _Relayed(b"0123456789"[offset : None if length is None else offset + length])

    engine.peers = Owner()  # type: ignore[assignment]
    resp = await client.get("/v1/files/r.bin", headers={**auth(), "Range": "bytes=5-"})
    assert resp.status == 206, await resp.text()
    assert await resp.read() == b"56789"
    assert resp.headers["Content-Range"] == "bytes 5-9/10"
    assert resp.headers["X-CallFS-Size"] == "10"
    assert asked == ["k-old", "k-new"]


async def test_a_move_onto_a_file_another_node_owns_is_done_here(
    client: TestClient[Any, Any], node: Node
) -> None:
    """Overwriting a destination that node b owns, with a source this node owns: this node moves
    it (b's blob goes to b's orphan sweep). Sending the PATCH to b sent it straight back (b
    routes it to the source's owner): hop after hop, then 502, nothing moved."""
    assert (await client.put("/v1/files/mine.bin", data=b"mine", headers=auth())).status == 201
    engine = node.engine
    assert engine is not None
    theirs = replace(_file("/theirs.bin", 5, "b"), owner="alice", blob_key="k-theirs")
    await engine._meta.create(theirs)
    resp = await client.patch(
        "/v1/files/mine.bin",
        json={"destination": "/theirs.bin", "overwrite": True},
        headers=auth(),
    )
    assert resp.status == 200, await resp.text()
    assert await resp.json() == {"path": "/theirs.bin"}
    moved = await engine.find("/theirs.bin")
    assert moved is not None and moved.instance_id == "a" and moved.size == 4
    assert await (await client.get("/v1/files/theirs.bin", headers=auth())).read() == b"mine"
    assert await engine.find("/mine.bin") is None


async def test_a_directory_move_to_a_node_checks_permission_first_and_takes_no_backend(
    node: Node, client: TestClient[Any, Any]
) -> None:
    """API.md §9.7: authorization (403) comes before the impossible-move checks (400); a
    directory cannot change backend, with or without ``instance``."""
    assert (await client.put("/v1/files/d/f.txt", data=b"data", headers=auth())).status == 201
    bob = auth(BOB_KEY)
    resp = await client.patch("/v1/files/d", json={"name": "d", "instance": "nope"}, headers=bob)
    assert resp.status == 403
    resp = await client.patch(
        "/v1/files/d", json={"name": "d", "instance": "a", "backend": "s3"}, headers=auth()
    )
    assert resp.status == 400
    assert (await resp.json())["message"] == "a directory cannot change backend or instance"


async def test_a_relayed_read_that_never_catches_the_current_version_is_503_not_412(
    client: TestClient[Any, Any], node: Node
) -> None:
    """412 is a node-to-node answer: a client whose GET keeps meeting a newer version at the
    owner gets 503 (retry), never PRECONDITION_FAILED."""
    engine = node.engine
    assert engine is not None
    current = replace(_file("/busy.bin", 10, "b"), blob_key="k0")
    await engine._meta.create(current)

    class Owner:
        async def open_read(self, *args: Any) -> Any:
            nonlocal current
            newer = replace(current, blob_key=current.blob_key + "'")
            current = await engine._meta.update(newer, current.version)
            raise VersionMoved()  # b has replaced it again meanwhile

    engine.peers = Owner()  # type: ignore[assignment]
    resp = await client.get("/v1/files/busy.bin", headers=auth())
    assert resp.status == 503, await resp.text()
    assert (await resp.json())["code"] == "UNAVAILABLE"


async def test_an_owner_ahead_of_this_nodes_metadata_is_503_not_412(
    client: TestClient[Any, Any], node: Node
) -> None:
    """The owner says 'moved' but this node still reads the same version: 503, never 412."""
    engine = node.engine
    assert engine is not None
    await engine._meta.create(replace(_file("/ahead.bin", 10, "b"), blob_key="k0"))

    class Owner:
        async def open_read(self, *args: Any) -> Any:
            raise VersionMoved()

    engine.peers = Owner()  # type: ignore[assignment]
    resp = await client.get("/v1/files/ahead.bin", headers=auth())
    assert resp.status == 503, await resp.text()


async def test_a_relayed_download_counts_as_a_read_on_the_owner_only(
    client: TestClient[Any, Any], node: Node
) -> None:
    """§16: proxied calls count on the owner like any other request. A GET relayed to the
    owner node counted a ``read`` on both nodes: twice in the cluster's sum."""
    engine = node.engine
    assert engine is not None
    await engine._meta.create(replace(_file("/far.bin", 5, "b"), blob_key="k-far"))

    class Owner:
        async def open_read(self, *args: Any) -> Any:
            return _Relayed(b"01234")

    engine.peers = Owner()  # type: ignore[assignment]
    reads = node.metrics.file_ops.labels("read", "localfs")
    before = reads._value.get()
    resp = await client.get("/v1/files/far.bin", headers=auth())
    assert resp.status == 200 and await resp.read() == b"01234"
    assert reads._value.get() == before  # the owner counts it
    assert (await client.put("/v1/files/near.bin", data=b"here", headers=auth())).status == 201
    assert (await client.get("/v1/files/near.bin", headers=auth())).status == 200
    assert reads._value.get() == before + 1
