"""HA replication (API.md §13): localfs primary, S3 replica (moto's server over HTTP)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from aiohttp.test_utils import TestClient
from moto.server import ThreadedMotoServer

from callfs.core.engine import REPLICA_DELETE, REPLICA_PUT, WorkElsewhere
from callfs.core.replication import WorkQueueWorker
from callfs.daemon import Node
from callfs.errors import ConfigError, ParentNotDirectory
from callfs.metrics import Metrics
from callfs.model import WorkItem
from callfs.storage.base import new_blob_key
from callfs.tests import s3server
from callfs.tests.functional.conftest import auth, make_config


def replica_env(bucket: str, endpoint: str, require: bool) -> dict[str, str]:
    return {
        "CALLFS_HA__REPLICATION_ENABLED": "true",
        "CALLFS_HA__REPLICA_BACKEND": "s3",
        "CALLFS_HA__REQUIRE_REPLICA_SUCCESS": "true" if require else "false",
        "CALLFS_BACKEND__S3_BUCKET_NAME": bucket,
        "CALLFS_BACKEND__S3_ENDPOINT": endpoint,
        "CALLFS_BACKEND__S3_ACCESS_KEY": "testing",
        "CALLFS_BACKEND__S3_SECRET_KEY": "testing",
    }


@pytest.fixture
async def replicated(tmp_path: Path, aiohttp_client: Any) -> AsyncIterator[tuple[Node, Any]]:
    bucket = s3server.make_bucket()
    node = Node(make_config(tmp_path, **replica_env(bucket, s3server.endpoint(), False)))
    node.build()
    await node.start_components()
    try:
        yield node, await aiohttp_client(node.app)
    finally:
        await node.stop()


def keys(bucket: str, endpoint: str | None = None) -> dict[str, bytes]:
    c = (
        s3server.client()
        if endpoint is None
        else boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **s3server.CREDS)
    )
    out: dict[str, bytes] = {}
    for o in c.list_objects_v2(Bucket=bucket).get("Contents", []):
        try:
            out[o["Key"]] = c.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
        except c.exceptions.NoSuchKey:
            continue  # removed by the worker between the listing and the read
    return out


async def eventually(check: Any, timeout: float = 20.0) -> None:
    """Poll ``check()`` (the replica is asynchronous) until it holds or the deadline passes."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        got = await asyncio.to_thread(check)
        if got is True:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"replica never converged: {got!r}")
        await asyncio.sleep(0.1)


async def copy_key(node: Node, path: str) -> str:
    """The replica's object key for the current version of ``path`` (copies are kept per blob)."""
    assert node.meta is not None
    entry = await node.meta.get(path)
    assert entry is not None and entry.blob_key is not None
    return ".callfs/replica/" + entry.blob_key


async def test_changes_reach_the_replica(replicated: tuple[Node, TestClient[Any, Any]]) -> None:
    node, client = replicated
    bucket = node.cfg.backend.s3_bucket_name

    def replica_is(expected: dict[str, bytes]) -> Any:
        got = keys(bucket)
        return True if got == expected else got

    assert (await client.put("/v1/files/r/a.txt", data=b"one", headers=auth())).status == 201
    first = await copy_key(node, "/r/a.txt")
    await eventually(lambda: replica_is({first: b"one"}))
    assert (await client.put("/v1/files/r/a.txt", data=b"two!", headers=auth())).status == 200
    second = await copy_key(node, "/r/a.txt")
    await eventually(lambda: replica_is({second: b"two!"}))  # the replaced copy is removed
    # a rename keeps the blob, so the copy stays valid
    resp = await client.patch("/v1/files/r/a.txt", json={"name": "b.txt"}, headers=auth())
    assert resp.status == 200
    assert await copy_key(node, "/r/b.txt") == second
    assert (await client.put("/v1/files/r/a.txt", data=b"one", headers=auth())).status == 201
    third = await copy_key(node, "/r/a.txt")
    await eventually(lambda: replica_is({second: b"two!", third: b"one"}))
    assert (await client.delete("/v1/files/r/b.txt", headers=auth())).status == 204
    assert (await client.post("/v1/files/r/dir/", headers=auth())).status == 201
    assert (await client.delete("/v1/files/r/a.txt", headers=auth())).status == 204
    await eventually(lambda: replica_is({}))  # directories are not replicated
    meta = node.meta
    assert meta is not None
    deadline = asyncio.get_running_loop().time() + 20
    queue = node.queue
    assert queue is not None
    while await queue.backlog() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)  # the ack follows the replica change
    assert await queue.backlog() == 0
    # reads never fall back to the replica: the primary is the truth
    local = Path(node.cfg.backend.localfs_root_path)
    assert not (local / "r" / "a.txt").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
@pytest.mark.parametrize("require", [False, True])
async def test_replica_down(tmp_path: Path, aiohttp_client: Any, require: bool) -> None:
    port = free_port()
    bucket = f"replica-{require}".lower()  # moto keeps its buckets for the whole process
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", **s3server.CREDS
    ).create_bucket(Bucket=bucket)
    node = Node(make_config(tmp_path, **replica_env(bucket, endpoint, require)))
    node.build()
    await node.start_components()
    try:
        client = await aiohttp_client(node.app)
        assert (await client.put("/v1/files/up.txt", data=b"ok", headers=auth())).status == 201
        server.stop()
        resp = await client.put("/v1/files/down.txt", data=b"primary", headers=auth())
        if require:
            assert resp.status == 500
            assert (await resp.json())["code"] == "INTERNAL_ERROR"
        else:
            assert resp.status == 201
        # the primary change stands either way, and the primary keeps serving
        got = await client.get("/v1/files/down.txt", headers=auth())
        assert got.status == 200 and await got.read() == b"primary"
        # queued durably, not lost: also when the request failed for it (review: with
        # require_replica_success the copy was never tried again)
        assert node.queue is not None
        assert await node.queue.backlog() >= 1
        failures = 'callfs_errors_total{component="replication",error_type="put"}'

        deadline = asyncio.get_running_loop().time() + 30
        while True:  # §16: the worker's failed tries count as errors too
            text = await (await client.get("/metrics", headers=auth())).text()
            line = next((ln for ln in text.splitlines() if ln.startswith(failures)), "")
            if line and float(line.split()[-1]) >= 2:
                break
            assert asyncio.get_running_loop().time() < deadline, line
            await asyncio.sleep(0.2)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()  # the replica is back (moto keeps its buckets in this process)

        want = {
            await copy_key(node, "/up.txt"): b"ok",
            await copy_key(node, "/down.txt"): b"primary",
        }

        def caught_up() -> Any:
            got = keys(bucket, endpoint)
            return True if got == want else got

        await eventually(caught_up, timeout=60)
        deadline = asyncio.get_running_loop().time() + 20
        while await node.queue.backlog():
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
    finally:
        await node.stop()
        server.stop()


async def test_unconfigured_replica_refused(tmp_path: Path) -> None:
    """By the config checks that ``callfs config validate`` runs too: it said "valid" for a
    config the server then refused to start with (found by review)."""
    env = {"CALLFS_HA__REPLICATION_ENABLED": "true", "CALLFS_HA__REPLICA_BACKEND": "s3"}
    with pytest.raises(ConfigError, match=r"ha\.replica_backend is 's3', but that backend"):
        make_config(tmp_path, **env)


@pytest.mark.slow
async def test_s3_failing_mid_upload(tmp_path: Path, aiohttp_client: Any) -> None:
    """S3 dies while a body streams: a JSON 503, no metadata row, no visible object."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **s3server.CREDS)
    s3.create_bucket(Bucket="primary")
    env = {
        "CALLFS_BACKEND__DEFAULT_BACKEND": "s3",
        "CALLFS_BACKEND__S3_BUCKET_NAME": "primary",
        "CALLFS_BACKEND__S3_ENDPOINT": endpoint,
        "CALLFS_BACKEND__S3_ACCESS_KEY": "testing",
        "CALLFS_BACKEND__S3_SECRET_KEY": "testing",
    }
    node = Node(make_config(tmp_path, **env))
    node.build()
    await node.start_components()
    try:
        client = await aiohttp_client(node.app)

        async def body() -> AsyncIterator[bytes]:
            for i in range(40):
                if i == 12:  # after the first part went up
                    await asyncio.to_thread(server.stop)
                yield b"p" * (1 << 20)

        resp = await client.put("/v1/files/dies.bin", data=body(), headers=auth())
        assert resp.status in (502, 503)
        assert (await resp.json())["code"] in ("UNAVAILABLE", "PEER_UNAVAILABLE")
        assert (await client.get("/v1/files/dies.bin", headers=auth())).status == 404
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        listing = s3.list_objects_v2(Bucket="primary")
        assert "Contents" not in listing  # no visible partial object
    finally:
        await node.stop()
        server.stop()


async def test_required_replica_is_written_from_the_body(
    tmp_path: Path, aiohttp_client: Any
) -> None:
    """``require_replica_success``: the copy is made while the body streams, not by re-reading
    the primary after the commit; a commit refused for sure removes the copy with the blob."""
    bucket = s3server.make_bucket()
    node = Node(make_config(tmp_path, **replica_env(bucket, s3server.endpoint(), True)))
    node.build()
    await node.start_components()
    try:
        client = await aiohttp_client(node.app)
        assert node.engine is not None
        local = node.engine.backend("localfs")
        reads: list[str] = []
        real_open = local.open_read

        async def counted(key: str, offset: int = 0, length: int | None = None) -> Any:
            reads.append(key)
            return await real_open(key, offset, length)

        local.open_read = counted  # type: ignore[method-assign]
        body = bytes(range(256)) * (12 * 1024 + 7)  # ~3 MiB, several chunks
        resp = await client.put("/v1/files/big.bin", data=io.BytesIO(body), headers=auth())
        assert resp.status == 201, await resp.text()
        assert reads == []  # the primary was never read back
        assert keys(bucket) == {await copy_key(node, "/big.bin"): body}
        # an update replaces the copy; the old version's copy goes with its blob
        resp = await client.put("/v1/files/big.bin", data=b"v2", headers=auth())
        assert resp.status == 200
        assert reads == []
        assert keys(bucket) == {await copy_key(node, "/big.bin"): b"v2"}
        # a commit refused for sure after the body was stored (the parent became a file
        # meanwhile): the blob and its copy are both removed
        assert node.meta is not None
        real_create = node.meta.create

        async def refused(*args: Any, **kwargs: Any) -> Any:
            raise ParentNotDirectory()

        node.meta.create = refused  # type: ignore[method-assign]
        resp = await client.put("/v1/files/new.bin", data=b"never named", headers=auth())
        node.meta.create = real_create  # type: ignore[method-assign]
        assert resp.status == 409, await resp.text()
        assert b"never named" not in keys(bucket).values()
        assert len(keys(bucket)) == 1
    finally:
        await node.stop()


async def test_a_copy_only_another_node_can_make_is_handed_back_not_dropped(
    replicated: tuple[Node, TestClient[Any, Any]],
) -> None:
    """A copy of another node's localfs blob whose path no longer names it (renamed or replaced
    since) can only be read on that node. A worker of this node used to call it done: the copy
    was lost whenever another node's worker claimed the item first. It is handed back to the
    queue instead, for the node that holds the bytes."""
    node, _client = replicated
    engine, queue = node.engine, node.queue
    assert engine is not None and queue is not None
    item = WorkItem(0, REPLICA_PUT, new_blob_key(), "localfs\tother-node\t/renamed-away.txt", 0)
    with pytest.raises(WorkElsewhere):
        await engine.apply_work(item)
    # a copy's removal from a replica this node does not write (it writes to s3)
    with pytest.raises(WorkElsewhere):
        await engine.apply_work(WorkItem(0, REPLICA_DELETE, new_blob_key(), "localfs", 0))
    await queue.enqueue(item.kind, item.key, item.arg, time.time())
    assert engine.on_work_queued is not None
    engine.on_work_queued()  # this node's worker claims it at once
    await asyncio.sleep(3.0)
    assert await queue.backlog() == 1  # still queued: handed back, not acknowledged
    (claimed,) = await queue.claim("the-other-node", 10, 10.0, time.time() + 60)
    assert claimed.key == item.key and claimed.attempts >= 2  # this node's worker had it


async def test_hand_backs_wait_by_their_own_claims_and_only_hopeless_ones_are_dropped() -> None:
    """Review of 421c079: one wait for the whole batch, from its most-claimed item, held a new
    item back a minute behind a stale one; and an item that failed for hours (a replica outage
    counts claims too) was dropped at its first hand-back though its node could still do it."""
    from callfs.core.replication import HAND_BACK, HAND_BACK_LIMIT, HAND_BACK_MAX

    class Queue:
        def __init__(self, items: list[WorkItem]) -> None:
            self.items = items
            self.retried: list[tuple[list[int], float]] = []
            self.acked: list[int] = []

        async def claim(self, *args: Any) -> list[WorkItem]:
            return self.items

        async def renew(self, worker: str, ids: Any, *args: Any) -> list[int]:
            return list(ids)

        async def ack(self, worker: str, ids: list[int]) -> None:
            self.acked += ids

        async def retry(self, worker: str, ids: list[int], not_before: float) -> None:
            self.retried.append((ids, not_before))

        async def backlog(self) -> int:
            return 0

    class Engine:
        async def apply_work(self, item: WorkItem) -> None:
            raise WorkElsewhere(item.arg, hopeless=item.arg == "hopeless")

    items = [
        WorkItem(1, REPLICA_PUT, "k1", "waits", 1),
        WorkItem(2, REPLICA_PUT, "k2", "waits", HAND_BACK_LIMIT + 5),  # failed for hours
        WorkItem(3, REPLICA_PUT, "k3", "hopeless", HAND_BACK_LIMIT),
        WorkItem(4, REPLICA_PUT, "k4", "hopeless", 2),
    ]
    queue = Queue(items)
    metrics = Metrics()
    worker = WorkQueueWorker(Engine(), queue, "n1", metrics)  # type: ignore[arg-type]
    started = time.time()
    await worker.drain_once()
    assert queue.acked == [3]  # only the hopeless one at the limit is dropped
    # logged and counted (§16: every logged internal failure; found by audit)
    assert metrics.errors.labels("replication", "dropped")._value.get() == 1
    waits = {tuple(ids): round(at - started) for ids, at in queue.retried}
    assert waits == {(1,): HAND_BACK, (4,): 2 * HAND_BACK, (2,): HAND_BACK_MAX}


async def test_an_unreachable_work_queue_is_counted() -> None:
    """§16: every logged internal failure counts; "work queue unreachable" was only logged
    (found by audit)."""
    from callfs.errors import Unavailable

    class Down:
        async def claim(self, *args: Any) -> list[WorkItem]:
            raise Unavailable("metadata store unavailable")

        async def backlog(self) -> int:
            raise Unavailable("metadata store unavailable")

    metrics = Metrics()
    worker = WorkQueueWorker(object(), Down(), "n1", metrics)  # type: ignore[arg-type]
    task = asyncio.ensure_future(worker._run())
    await asyncio.sleep(0.1)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert metrics.errors.labels("replication", "queue")._value.get() >= 1
