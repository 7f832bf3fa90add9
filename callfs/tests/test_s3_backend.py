"""S3 specifics against moto's server over HTTP: multipart, abort, start-up checks, SSE, and a node
whose default backend is S3, with moves between localfs and S3."""

from __future__ import annotations

import io
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from botocore.exceptions import ClientError

from callfs.daemon import Node
from callfs.errors import ConfigError
from callfs.storage.s3 import S3Backend
from callfs.tests import s3server
from callfs.tests.functional.conftest import auth, make_config

MiB = 1 << 20


async def parts(data: bytes, size: int = MiB) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def test_multipart_upload_and_ranges() -> None:
    async with s3server.s3_backend(part_size=5 * MiB) as backend:
        data = os.urandom(20 * MiB + 123)
        staged = await backend.stage("/big/blob.bin", parts(data))
        assert staged._upload and len(staged._upload["parts"]) == 5  # type: ignore[attr-defined]
        uploads = s3server.client().list_multipart_uploads(Bucket=backend.bucket)
        assert len(uploads.get("Uploads", [])) == 1  # in flight, not visible yet
        assert await backend.stat("/big/blob.bin") is None
        await staged.publish()
        stream = await backend.open_read("/big/blob.bin", 5 * MiB - 10, 20)
        assert b"".join([c async for c in stream]) == data[5 * MiB - 10 : 5 * MiB + 10]
        await stream.aclose()
        head = s3server.client().head_object(Bucket=backend.bucket, Key="big/blob.bin")
        assert head["ContentLength"] == len(data)
        assert head["ServerSideEncryption"] == "AES256"


async def test_failed_upload_aborts_multipart() -> None:
    async def failing() -> AsyncIterator[bytes]:
        for _ in range(12):
            yield b"z" * MiB
        raise ConnectionResetError("client went away")

    async with s3server.s3_backend(part_size=5 * MiB) as backend:
        with pytest.raises(ConnectionResetError):
            await backend.stage("/f.bin", failing())
        uploads = s3server.client().list_multipart_uploads(Bucket=backend.bucket)
        assert uploads.get("Uploads", []) == []
        assert await backend.stat("/f.bin") is None


async def test_the_stale_upload_sweep_spares_uploads_still_being_written() -> None:
    """``sweep_temp`` aborts multipart uploads older than its grace, but never one this node is
    still writing: moto dates every upload 2010, so a sweep during a big upload used to abort it
    (UploadPart then failed: a 500 to the client). An upload nobody writes is still swept."""
    async with s3server.s3_backend(part_size=5 * MiB) as backend:
        data = os.urandom(12 * MiB + 5)
        swept: list[int] = []

        async def body() -> AsyncIterator[bytes]:
            for i in range(0, len(data), MiB):
                if i == 8 * MiB:  # a part is up: the upload exists, and is ours
                    swept.append(await backend.sweep_temp(0.0))
                yield data[i : i + MiB]

        stale = s3server.client().create_multipart_upload(
            Bucket=backend.bucket, Key=".callfs/blobs/stale"
        )
        blob = uuid.uuid4().hex  # a blob key, as the engine stages: under .callfs/blobs/
        staged = await backend.stage(blob, body())
        await staged.publish()
        assert swept == [1]  # the stale one
        stream = await backend.open_read(blob, 0, len(data))
        assert b"".join([c async for c in stream]) == data
        await stream.aclose()
        uploads = s3server.client().list_multipart_uploads(Bucket=backend.bucket)
        assert [u["UploadId"] for u in uploads.get("Uploads", [])] == []
        assert stale["UploadId"] and not backend.writing


async def test_the_sweep_spares_another_process_upload_that_still_receives_parts() -> None:
    """An upload of another process (a worker of this node, or another node on the bucket) is
    not in this backend's ``writing`` set: the sweep looks at its newest part. One that received
    a part within the grace is left alone however old it is; one whose parts all came before the
    grace is aborted (moto dates every upload 2010, parts at their real time)."""
    async with s3server.s3_backend(part_size=5 * MiB) as backend:
        client = s3server.client()
        busy = client.create_multipart_upload(Bucket=backend.bucket, Key=".callfs/blobs/busy")
        client.upload_part(
            Bucket=backend.bucket,
            Key=".callfs/blobs/busy",
            UploadId=busy["UploadId"],
            PartNumber=1,
            Body=b"x" * 5 * MiB,
        )
        idle = client.create_multipart_upload(Bucket=backend.bucket, Key=".callfs/blobs/idle")
        assert await backend.sweep_temp(60.0) == 1  # the idle one: no part, started in 2010
        left = client.list_multipart_uploads(Bucket=backend.bucket).get("Uploads", [])
        assert [u["UploadId"] for u in left] == [busy["UploadId"]]
        assert idle["UploadId"]
        assert await backend.sweep_temp(-60.0) == 1  # its newest part is older than "now + 60 s"
        assert client.list_multipart_uploads(Bucket=backend.bucket).get("Uploads", []) == []


async def test_the_sweep_leaves_an_upload_alone_when_its_parts_cannot_be_listed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without ``s3:ListMultipartUploadParts`` (or when S3 throttles) the sweep cannot tell an
    idle upload from one in progress elsewhere: it aborts neither, and the pass goes on."""
    async with s3server.s3_backend(part_size=5 * MiB) as backend:
        client = s3server.client()
        old = client.create_multipart_upload(Bucket=backend.bucket, Key=".callfs/blobs/old")

        def denied(**kwargs: Any) -> Any:
            raise ClientError({"Error": {"Code": "AccessDenied", "Message": "no"}}, "ListParts")

        monkeypatch.setattr(backend.client, "list_parts", denied)
        assert await backend.sweep_temp(60.0) == 0
        left = client.list_multipart_uploads(Bucket=backend.bucket).get("Uploads", [])
        assert [u["UploadId"] for u in left] == [old["UploadId"]]
        monkeypatch.undo()
        assert await backend.sweep_temp(60.0) == 1  # listable again: idle since 2010, aborted


async def test_start_checks() -> None:
    missing = S3Backend(
        bucket="no-such-bucket-callfs",
        endpoint=s3server.endpoint(),
        access_key="testing",
        secret_key="testing",
    )
    with pytest.raises(ConfigError, match=r"backend\.s3_bucket_name"):
        await missing.start()
    unreachable = S3Backend(
        bucket="x", endpoint="http://127.0.0.1:9", access_key="testing", secret_key="testing"
    )
    with pytest.raises(ConfigError, match="not reachable"):
        await unreachable.start()


def s3_config(tmp_path: Path, **extra: str) -> Any:
    """A node's config with S3 on a fresh bucket of the moto server (``extra``: more settings)."""
    return make_config(
        tmp_path,
        CALLFS_BACKEND__S3_BUCKET_NAME=s3server.make_bucket(),
        CALLFS_BACKEND__S3_ENDPOINT=s3server.endpoint(),
        CALLFS_BACKEND__S3_ACCESS_KEY="testing",
        CALLFS_BACKEND__S3_SECRET_KEY="testing",
        **extra,
    )


@pytest.fixture
async def s3_node(tmp_path: Path) -> AsyncIterator[Node]:
    cfg = s3_config(tmp_path, CALLFS_BACKEND__DEFAULT_BACKEND="s3")
    node = Node(cfg)
    node.build()
    await node.start_components()
    try:
        yield node
    finally:
        await node.stop()


async def test_s3_default_backend_and_moves(s3_node: Node, aiohttp_client: Any) -> None:
    client: TestClient[Any, Any] = await aiohttp_client(s3_node.app)
    bucket = s3_node.cfg.backend.s3_bucket_name
    blob = os.urandom(3 * MiB)
    resp = await client.put("/v1/files/s3dir/a.bin", data=io.BytesIO(blob), headers=auth())
    assert resp.status == 201
    entry = await s3_node.meta.get("/s3dir/a.bin")
    first_key = ".callfs/blobs/" + entry.blob_key
    head = s3server.client().head_object(Bucket=bucket, Key=first_key)
    assert head["ContentLength"] == len(blob)
    resp = await client.head("/v1/files/s3dir/a.bin", headers=auth())
    assert "X-CallFS-Instance-ID" not in resp.headers  # S3 items belong to no node
    resp = await client.get("/v1/files/s3dir/a.bin", headers={**auth(), "Range": "bytes=1-4"})
    assert resp.status == 206 and await resp.read() == blob[1:5]
    # s3 -> localfs, then back
    resp = await client.patch(
        "/v1/files/s3dir/a.bin",
        json={"destination": "/s3dir/a.bin", "backend": "localfs"},
        headers=auth(),
    )
    assert resp.status == 200, await resp.text()
    entry = await s3_node.meta.get("/s3dir/a.bin")
    key = entry.blob_key
    local = Path(s3_node.cfg.backend.localfs_root_path) / ".callfs/blobs" / key[:2] / key[2:4] / key
    assert local.read_bytes() == blob
    assert "Contents" not in s3server.client().list_objects_v2(Bucket=bucket, Prefix=first_key)
    resp = await client.head("/v1/files/s3dir/a.bin", headers=auth())
    assert resp.headers["X-CallFS-Instance-ID"] == "callfs-instance-1"
    resp = await client.patch(
        "/v1/files/s3dir/a.bin",
        json={"destination": "/moved/b.bin", "backend": "s3", "create_parents": True},
        headers=auth(),
    )
    assert resp.status == 200, await resp.text()
    assert not local.exists()
    assert await (await client.get("/v1/files/moved/b.bin", headers=auth())).read() == blob
    resp = await client.delete("/v1/files/moved/b.bin", headers=auth())
    assert resp.status == 204
    assert "Contents" not in s3server.client().list_objects_v2(Bucket=bucket, Prefix=".callfs/")


async def test_parts_are_cut_exactly_from_any_chunking_and_carry_a_crc32() -> None:
    """Bodies around the part size, in chunks that straddle part boundaries, from a producer
    that reuses its buffer (the backend must not keep views of it): every byte lands where it
    belongs, and each multipart object carries the composite CRC32 of its parts."""
    reused = bytearray(777_777)

    async def reusing(data: bytes) -> AsyncIterator[bytearray | bytes]:
        for i in range(0, len(data), len(reused)):
            piece = data[i : i + len(reused)]
            reused[: len(piece)] = piece
            yield reused if len(piece) == len(reused) else bytes(piece)
            reused[:] = b"\0" * len(reused)  # what a producer reusing its buffer does next

    async with s3server.s3_backend(part_size=5 * MiB) as backend:
        for n, size in enumerate((0, 1, 5 * MiB - 1, 5 * MiB, 5 * MiB + 1, 10 * MiB + 7)):
            data = os.urandom(size)
            staged = await backend.stage(f"/cut/{n}.bin", reusing(data))
            await staged.publish()
            stream = await backend.open_read(f"/cut/{n}.bin")
            assert b"".join([bytes(c) async for c in stream]) == data, size
            await stream.aclose()
            if size >= 5 * MiB:
                head = s3server.client().head_object(
                    Bucket=backend.bucket, Key=f"cut/{n}.bin", ChecksumMode="ENABLED"
                )
                assert head.get("ChecksumCRC32"), head


async def test_a_multipart_object_is_not_taken_as_older_than_it_is() -> None:
    """From a crash-safety review: S3 gives a multipart object the time its upload began, so one
    that took longer than the orphan sweep's grace looked old the moment it was completed, and
    a sweep before the metadata commit could remove it. A listing adds a day to such objects."""
    import time

    from callfs.storage.base import AREA_BLOBS, new_blob_key
    from callfs.storage.s3 import MULTIPART_AGE_SLACK

    async with s3server.s3_backend(part_size=5 * MiB) as backend:
        big, small = new_blob_key(), new_blob_key()
        staged = await backend.stage(big, parts(os.urandom(11 * MiB)))
        await staged.publish()
        staged = await backend.stage(small, parts(b"tiny"))
        await staged.publish()
        listed = {o.key: o.mtime for o in await backend.list_keys(AREA_BLOBS, "", 100)}
        now = time.time()
        assert listed[big] > now + MULTIPART_AGE_SLACK - 600  # taken as written a day later
        assert abs(listed[small] - now) < 600  # a plain PUT's LastModified is when it landed


async def test_a_write_during_a_move_to_another_backend_waits_only_for_its_commit(
    tmp_path: Path, aiohttp_client: Any
) -> None:
    """§14: a lock covers a commit, not a transfer. A move to another backend held the path's
    lock for the whole copy, so a PUT of the file meanwhile timed out on the lock (503) once the
    copy took longer than ``dlm.lock_timeout`` (found by review: a 300 MiB move into S3). The
    PUT now commits at once; the move, whose command is conditional on the version it copied,
    copies the new version and then wins: one whole version, nothing left over."""
    import asyncio

    cfg = s3_config(tmp_path, CALLFS_DLM__LOCK_TIMEOUT="300ms")
    node = Node(cfg)
    node.build()
    await node.start_components()
    try:
        client: TestClient[Any, Any] = await aiohttp_client(node.app)
        big = os.urandom(64 * MiB)
        resp = await client.put("/v1/files/t/f", data=io.BytesIO(big), headers=auth())
        assert resp.status == 201
        loop = asyncio.get_running_loop()
        started = loop.time()
        move = asyncio.ensure_future(
            client.patch(
                "/v1/files/t/f", json={"destination": "/t/f", "backend": "s3"}, headers=auth()
            )
        )
        await asyncio.sleep(0.1)
        resp = await client.put("/v1/files/t/f", data=b"tiny", headers=auth())
        assert resp.status == 200, await resp.text()
        put_done = loop.time()
        resp = await move
        assert resp.status == 200, await resp.text()
        assert put_done < loop.time() - 0.3  # not vacuous: the copy outlasted the lock wait
        resp = await client.get("/v1/files/t/f", headers=auth())
        assert await resp.read() == b"tiny"
        entry = await node.meta.get("/t/f")
        assert entry is not None and entry.backend_type.value == "s3"
        blobs = Path(cfg.backend.localfs_root_path) / ".callfs/blobs"
        assert [p for p in blobs.rglob("*") if p.is_file()] == []
        assert started < put_done
    finally:
        await node.stop()
