"""fsck on one node (SQLite + localfs + erasure 2+1): every kind of finding is planted behind the
server's back, reported with its label and key, and ``--repair`` removes only what no record
names (docs/operations.md)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from click.testing import CliRunner

from callfs.cli import cli
from callfs.daemon import Node
from callfs.storage.base import new_blob_key
from callfs.tests.functional.conftest import INTERNAL, auth

INTERNAL_AUTH = {"Authorization": f"Bearer {INTERNAL}"}
OLD = time.time() - 2 * 3600  # older than the grace the tests use
GRACE = "600"


@pytest.fixture
def config_env() -> dict[str, str]:
    return {
        "CALLFS_ERASURE__ENABLED": "true",
        "CALLFS_ERASURE__DATA_SHARDS": "2",
        "CALLFS_ERASURE__PARITY_SHARDS": "1",
    }


def blob_path(root: Path, key: str) -> Path:
    return root / ".callfs" / "blobs" / key[:2] / key[2:4] / key


def age(path: Path) -> None:
    os.utime(path, (OLD, OLD))


def plant(path: Path, data: bytes, old: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if old:
        age(path)
    return path


async def put(client: TestClient[Any, Any], path: str, data: bytes, erasure: bool = False) -> None:
    headers = {**auth(), "X-CallFS-Erasure": "true"} if erasure else auth()
    resp = await client.post(f"/v1/files{path}", data=io.BytesIO(data), headers=headers)
    assert resp.status == 201, await resp.text()


async def fsck(client: TestClient[Any, Any], **body: Any) -> dict[str, Any]:
    resp = await client.post("/v1/internal/fsck", json=body, headers=INTERNAL_AUTH)
    assert resp.status == 200, await resp.text()
    report: dict[str, Any] = await resp.json()
    return report


def labelled(report: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(f["kind"], f["key"]): f for f in report["findings"]}


async def test_fsck_reports_and_repairs_only_what_is_safe(
    client: TestClient[Any, Any], node: Node, tmp_path: Path
) -> None:
    assert node.meta is not None
    me = node.cfg.instance_discovery.instance_id
    root = tmp_path / "files"
    await put(client, "/keep.txt", b"keep me")
    await put(client, "/gone.txt", b"about to vanish")
    await put(client, "/short.txt", b"0123456789")
    await put(client, "/dir/e.bin", os.urandom(300_000), erasure=True)
    await put(client, "/dir/whole.bin", os.urandom(1000), erasure=True)
    keys: dict[str, str] = {}
    for name in ("/keep.txt", "/gone.txt", "/short.txt", "/dir/e.bin"):
        entry = await node.meta.get(name)
        assert entry is not None and entry.blob_key is not None
        keys[name] = entry.blob_key
    upload = keys["/dir/e.bin"]

    # Every referenced byte looks old: only the records protect them from the repair.
    for stored in root.rglob("*"):
        if stored.is_file():
            age(stored)
    blob_path(root, keys["/gone.txt"]).unlink()  # missing
    os.truncate(blob_path(root, keys["/short.txt"]), 4)  # size-mismatch
    orphan = new_blob_key()
    plant(blob_path(root, orphan), b"nobody names me")  # orphan
    young = new_blob_key()
    plant(blob_path(root, young), b"just published", old=False)  # within the grace: not reported
    temp = plant(root / ".callfs" / "tmp" / "deadbeef.part", b"half an upload")  # stale-temp
    stray = new_blob_key()
    for index in (0, 1, 2):  # an erasure upload no entry names (a crashed upload)
        plant(root / ".erasure" / stray / str(index), b"shard")
    (root / ".erasure" / upload / "1").unlink()  # missing shard

    report = await fsck(client, grace=float(GRACE))
    found = labelled(report)
    assert report["clean"] is False
    assert report["counts"] == {"orphan": 4, "missing": 2, "size-mismatch": 1, "stale-temp": 1}
    assert report["entries_checked"] == 5
    assert found[("orphan", orphan)]["area"] == "blobs"
    assert found[("orphan", orphan)]["node"] == me
    for index in (0, 1, 2):
        assert found[("orphan", f".erasure/{stray}/{index}")]["area"] == "shards"
    assert found[("missing", keys["/gone.txt"])]["path"] == "/gone.txt"
    mismatch = found[("size-mismatch", keys["/short.txt"])]
    assert (mismatch["path"], mismatch["size"], mismatch["expected_size"]) == ("/short.txt", 4, 10)
    shard = found[("missing", f".erasure/{upload}/1")]
    assert (shard["path"], shard["backend"], shard["area"]) == ("/dir/e.bin", "erasure", "shards")
    assert found[("stale-temp", ".callfs/tmp/deadbeef.part")]["node"] == me
    assert not any(f["key"] == young for f in report["findings"])
    assert not any(f["repaired"] for f in report["findings"])
    assert orphan in os.listdir(blob_path(root, orphan).parent)  # a check deletes nothing

    # --repair through the CLI: orphans and the stale temp go, nothing a record names does.
    base = str(client.make_url("/")).rstrip("/")
    args = ["fsck", "--repair", "--grace", GRACE, "--url", base, "--internal-secret", INTERNAL]
    result = await asyncio.to_thread(CliRunner().invoke, cli, [*args, "--json"])
    assert result.exit_code == 1, result.output  # missing and size-mismatch stay
    repaired = json.loads(result.output)
    assert {(f["kind"], f["key"]) for f in repaired["findings"] if f["repaired"]} == {
        ("orphan", orphan),
        *{("orphan", f".erasure/{stray}/{i}") for i in (0, 1, 2)},
        ("stale-temp", ".callfs/tmp/deadbeef.part"),
    }
    assert not blob_path(root, orphan).exists()
    assert not (root / ".erasure" / stray).exists() or not any(
        (root / ".erasure" / stray).iterdir()
    )
    assert not temp.exists()
    assert blob_path(root, young).exists()
    assert blob_path(root, keys["/keep.txt"]).read_bytes() == b"keep me"
    assert blob_path(root, keys["/short.txt"]).exists()
    assert sorted(p.name for p in (root / ".erasure" / upload).iterdir()) == ["0", "2"]
    for path in ("/keep.txt", "/dir/e.bin", "/dir/whole.bin"):
        resp = await client.get(f"/v1/files{path}", headers=auth())
        assert resp.status == 200, path
        await resp.read()

    # Afterwards only what a repair cannot fix is left; the text report names each.
    result = await asyncio.to_thread(CliRunner().invoke, cli, args[:1] + args[2:])
    assert result.exit_code == 1, result.output
    assert "orphan=0 missing=2 size-mismatch=1 stale-temp=0" in result.output
    assert f"missing       {me} localfs/blobs {keys['/gone.txt']} path=/gone.txt" in result.output
    assert "size-mismatch" in result.output and "path=/short.txt" in result.output


async def test_clean_node_exits_zero_and_sweep_covers_shards(
    client: TestClient[Any, Any], node: Node, tmp_path: Path
) -> None:
    assert node.fsck is not None
    root = tmp_path / "files"
    await put(client, "/a.txt", b"a")
    await put(client, "/e.bin", b"erasure", erasure=True)
    base = str(client.make_url("/")).rstrip("/")
    args = ["fsck", "--url", base, "--internal-secret", INTERNAL]
    result = await asyncio.to_thread(CliRunner().invoke, cli, args)
    assert result.exit_code == 0, result.output
    assert "orphan=0 missing=0 size-mismatch=0 stale-temp=0" in result.output

    # The periodic sweep (the same node-local pass) removes old orphans of every area.
    stray = new_blob_key()
    plant(root / ".erasure" / stray / "0", b"shard")
    plant(blob_path(root, new_blob_key()), b"orphan")
    plant(root / ".callfs" / "tmp" / "cafe.part", b"temp")
    assert await node.fsck.sweep(600.0) == 3
    assert await node.fsck.sweep(600.0) == 0
    result = await asyncio.to_thread(CliRunner().invoke, cli, args)
    assert result.exit_code == 0, result.output


async def test_internal_endpoints_need_the_internal_secret(client: TestClient[Any, Any]) -> None:
    for path in ("/v1/internal/fsck", "/v1/internal/fsck/local", "/v1/internal/fsck/stat"):
        resp = await client.post(path, json={}, headers=auth())
        assert resp.status == 401
    resp = await client.post("/v1/internal/fsck", json={"grace": -1}, headers=INTERNAL_AUTH)
    assert resp.status == 400
    resp = await client.post(
        "/v1/internal/fsck/stat",
        json={"items": [["localfs", new_blob_key()]]},
        headers=INTERNAL_AUTH,
    )
    assert await resp.json() == {"sizes": [None]}


async def test_replica_copies_and_s3_blobs(tmp_path: Path, aiohttp_client: Any) -> None:
    """HA replication (localfs primary, S3 replica on moto's server): a missing copy is found
    and queued again by --repair; orphan S3 blobs and copies are removed."""
    from callfs.tests import s3server
    from callfs.tests.functional.conftest import make_config
    from callfs.tests.test_replication import eventually, replica_env

    bucket = s3server.make_bucket()
    node = Node(make_config(tmp_path, **replica_env(bucket, s3server.endpoint(), False)))
    node.build()
    await node.start_components()
    try:
        assert node.meta is not None
        client = await aiohttp_client(node.app)
        await put(client, "/r.txt", b"replicate me")
        entry = await node.meta.get("/r.txt")
        assert entry is not None and entry.blob_key is not None
        copy = f".callfs/replica/{entry.blob_key}"
        s3 = s3server.client()

        def has_copy() -> bool:
            return copy in {o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])}

        await eventually(has_copy)
        s3.delete_object(Bucket=bucket, Key=copy)
        orphan_blob, orphan_copy = new_blob_key(), new_blob_key()
        s3.put_object(Bucket=bucket, Key=f".callfs/blobs/{orphan_blob}", Body=b"x")
        s3.put_object(Bucket=bucket, Key=f".callfs/replica/{orphan_copy}", Body=b"y")

        report = await fsck(client, grace=0)
        found = labelled(report)
        assert report["counts"] == {"orphan": 2, "missing": 1, "size-mismatch": 0, "stale-temp": 0}
        assert found[("orphan", orphan_blob)]["backend"] == "s3"
        assert found[("orphan", f"r/{orphan_copy}")]["area"] == "replica"
        missing = found[("missing", f"r/{entry.blob_key}")]
        assert (missing["path"], missing["backend"], missing["area"]) == ("/r.txt", "s3", "replica")

        report = await fsck(client, grace=0, repair=True)
        assert report["clean"] is True, report
        assert report["repaired"] == 3
        await eventually(has_copy)  # the worker copied it again
        report = await fsck(client, grace=0)
        assert report["clean"] is True and report["findings"] == [], report
        assert (
            await (await client.get("/v1/files/r.txt", headers=auth())).read()
        ) == b"replicate me"
    finally:
        await node.stop()


async def test_shard_a_repair_moved_elsewhere_is_an_orphan(
    client: TestClient[Any, Any], node: Node, tmp_path: Path
) -> None:
    """A shard the layout now places on another node (a repair rebuilt it there while this node
    was away) is an orphan here; fsck's repair removes it, the sweep leaves it to fsck."""
    from dataclasses import replace

    assert node.meta is not None and node.fsck is not None
    await put(client, "/moved.bin", os.urandom(5000), erasure=True)
    entry = await node.meta.get("/moved.bin")
    assert entry is not None and entry.blob_key is not None
    layout = await node.meta.get_erasure(entry.blob_key)
    assert layout is not None
    shards = tuple(replace(s, instance_id="node-x") if s.index == 1 else s for s in layout.shards)
    await node.meta.put_erasure(replace(layout, shards=shards))
    for stored in (tmp_path / "files" / ".erasure").rglob("*"):
        if stored.is_file():
            age(stored)
    key = f".erasure/{entry.blob_key}/1"

    report = await node.fsck.scan_local(repair=False, grace=600.0)
    assert [(f.kind, f.key) for f in report.findings] == [("orphan", key)]
    assert "another node" in report.findings[0].detail
    assert await node.fsck.sweep(600.0) == 0  # the sweep reads no layouts
    report = await node.fsck.scan_local(repair=True, grace=600.0)
    assert [f.repaired for f in report.findings] == [True]
    assert sorted(p.name for p in (tmp_path / "files" / ".erasure" / entry.blob_key).iterdir()) == [
        "0",
        "2",
    ]


async def test_a_failed_scan_names_no_server_path(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From a security audit: a scan that failed with an OSError reported its text, which names
    the server's path, to the caller of fsck (the CLI prints it)."""
    assert node.fsck is not None

    async def failing(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(13, "Permission denied", "/srv/callfs/secret-place/.callfs/blobs")

    monkeypatch.setattr(node.fsck, "scan_local", failing)
    answer = await node.fsck._ask_local(node.fsck.instance_id, False, 600.0)
    assert answer == "scan failed: Permission denied"
