"""A ``callfs server`` (SQLite metadata, localfs bytes) killed with SIGKILL at each step of a write
(``crash_points.py``: body staged; every byte written to its temp file; renamed to its blob key but
not fsync'd; fsync'd; metadata committed), for an overwrite and for a new file, then restarted on
the same data.

Before the metadata commit the old state must be whole (the old bytes, or no file); after it, the
new; never a partial or mixed file, whatever the step. fsck then finds nothing missing and no size
mismatch: what the crash left is at most unreferenced bytes (orphans, stale temp files), which
``fsck --repair`` removes without touching a referenced blob.
"""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cluster_tests.harness import API_KEY, INTERNAL, ClusterNode, free_ports, node_config

pytestmark = pytest.mark.slow
H = {"Authorization": f"Bearer {API_KEY}"}
WRAPPER = Path(__file__).with_name("crash_points.py")
POINTS = ["staged", "written", "renamed", "published", "committed"]
V1 = b"version one " * 1000
V2 = b"VERSION TWO, LONGER " * 3000
NEW = b"a new file " * 700


def fsck(node: ClusterNode, *extra: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "callfs", "fsck", "--json", "--url", node.base,
         "--internal-secret", INTERNAL, "--grace", "0", *extra],
        capture_output=True,
        timeout=120,
        check=False,
    )  # fmt: skip
    assert done.stdout, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


async def crash(node: ClusterNode, arm: Path, request: Any) -> None:
    """Run ``request`` with the kill armed: the server must die before answering."""
    arm.touch()
    with pytest.raises((aiohttp.ClientError, ConnectionError)):
        await request
    assert node.proc is not None
    assert await asyncio.to_thread(node.proc.wait, 30) == -9, node.logs()
    arm.unlink()
    await asyncio.to_thread(node.start)


async def read(s: aiohttp.ClientSession, node: ClusterNode, path: str) -> tuple[int, bytes]:
    async with s.get(f"{node.base}/v1/files{path}", headers=H) as r:
        return r.status, await r.read()


def crash_node(tmp_path: Path, point: str, **sections: dict[str, Any]) -> tuple[ClusterNode, Path]:
    """One SQLite + localfs node run by the crash wrapper at ``point`` (config ``sections``
    merged in), not started; and the file that arms the kill."""
    port = free_ports(1)[0]
    metadata = {"type": "sqlite", "sqlite_path": str(tmp_path / "metadata.sqlite3")}
    config = node_config("solo", port, tmp_path, {}, metadata, {"type": "local"})
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    arm = tmp_path / "arm"
    env = {"CRASH_POINT": point, "CRASH_ARM": str(arm)}
    return ClusterNode("solo", port, tmp_path, config, launcher=(str(WRAPPER),), env=env), arm


def replicated_crash_node(tmp_path: Path) -> tuple[ClusterNode, Path, str]:
    """``crash_node`` at "committed" with HA replication to a fresh moto bucket: also the
    bucket's name."""
    from callfs.tests import s3server

    bucket = s3server.make_bucket()
    s3 = {"s3_bucket_name": bucket, "s3_endpoint": s3server.endpoint()}
    node, arm = crash_node(
        tmp_path,
        "committed",
        backend={**s3, "s3_access_key": "testing", "s3_secret_key": "testing"},
        ha={"replication_enabled": True, "replica_backend": "s3"},
    )
    return node, arm, bucket


async def replica_holds(node: ClusterNode, bucket: str, sizes: list[int]) -> None:
    """Within 30 s, fsck finds no missing copy and the replica holds copies of ``sizes``."""
    from callfs.tests import s3server

    deadline = asyncio.get_running_loop().time() + 30
    while True:
        report = await asyncio.to_thread(fsck, node)
        copies = s3server.client().list_objects_v2(Bucket=bucket, Prefix=".callfs/replica/")
        held = [o["Size"] for o in copies.get("Contents", [])]
        if report["counts"]["missing"] == 0 and held == sizes:
            return
        assert asyncio.get_running_loop().time() < deadline, (report, held)
        await asyncio.sleep(0.5)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("point", POINTS)
async def test_a_kill_at_each_step_of_a_write(tmp_path: Path, point: str) -> None:
    node, arm = crash_node(tmp_path, point)
    committed = point == "committed"
    await asyncio.to_thread(node.start)
    try:
        async with aiohttp.ClientSession() as s:
            url = f"{node.base}/v1/files/d/old.bin"
            async with s.put(url, data=io.BytesIO(V1), headers=H) as r:
                assert r.status == 201, await r.text()
            # an overwrite killed at the step
            await crash(node, arm, s.put(url, data=io.BytesIO(V2), headers=H))
            assert await read(s, node, "/d/old.bin") == (200, V2 if committed else V1)
            # a new file killed at the step
            new = f"{node.base}/v1/files/d/new.bin"
            await crash(node, arm, s.put(new, data=io.BytesIO(NEW), headers=H))
            status, body = await read(s, node, "/d/new.bin")
            assert (status, body) == ((200, NEW) if committed else (404, body))
            async with s.get(f"{node.base}/v1/directories/d", headers=H) as r:
                listed = {e["name"]: e["size"] for e in (await r.json())["items"]}
            want = {"old.bin": len(V2 if committed else V1)}
            if committed:
                want["new.bin"] = len(NEW)
            assert listed == want

            report = await asyncio.to_thread(fsck, node)
            counts = report["counts"]
            assert counts["missing"] == 0 and counts["size-mismatch"] == 0, report
            # what a kill leaves: the killed write's bytes, unreferenced (the replaced version's
            # blob too when the kill came after the commit, before its reclaim)
            assert counts["orphan"] + counts["stale-temp"] <= 2, report
            if point in ("renamed", "published"):
                assert counts["orphan"] >= 1, report  # the renamed blob, never referenced
            if point in ("staged", "written"):  # the start-up sweep of .callfs/tmp removed them
                assert counts["orphan"] + counts["stale-temp"] == 0, report
            report = await asyncio.to_thread(fsck, node, "--repair")
            report = await asyncio.to_thread(fsck, node)
            assert sum(report["counts"].values()) == 0, report
            assert await read(s, node, "/d/old.bin") == (200, V2 if committed else V1)
            if committed:
                assert await read(s, node, "/d/new.bin") == (200, NEW)
    finally:
        await asyncio.to_thread(node.stop)


@pytest.mark.timeout(120)
async def test_a_kill_right_after_the_commit_still_gets_the_replica_copy(tmp_path: Path) -> None:
    """HA replication (asynchronous): the copy's work item was queued after the metadata commit,
    so a kill between the two left a committed, readable version that nothing would ever copy
    to the replica (found by review; only ``fsck --repair`` found it). It is queued before the
    commit now: after the restart the worker copies it."""
    node, arm, bucket = replicated_crash_node(tmp_path)
    await asyncio.to_thread(node.start)
    try:
        async with aiohttp.ClientSession() as s:
            url = f"{node.base}/v1/files/d/new.bin"
            await crash(node, arm, s.put(url, data=io.BytesIO(NEW), headers=H))
            assert await read(s, node, "/d/new.bin") == (200, NEW)
            await replica_holds(node, bucket, [len(NEW)])
    finally:
        await asyncio.to_thread(node.stop)


@pytest.mark.timeout(120)
async def test_a_kill_right_after_a_move_commit_still_gets_the_replica_copy(
    tmp_path: Path,
) -> None:
    """A PATCH to another backend copies the bytes into a new blob and switches the record to
    it; that blob's replica copy was queued after the commit, so a kill between the two left
    the moved file without a copy on the replica (the same gap the writes had). Queued before
    the commit now: after the restart the worker copies it."""
    node, arm, bucket = replicated_crash_node(tmp_path)
    await asyncio.to_thread(node.start)
    try:
        async with aiohttp.ClientSession() as s:
            url = f"{node.base}/v1/files/d/moved.bin"
            async with s.put(url, data=NEW, headers=H) as r:
                assert r.status == 201, await r.text()
            # to S3 (the replica's own backend: no copy), then back to localfs, killed just
            # after that commit
            async with s.patch(url, json={"destination": "/d/moved.bin", "backend": "s3"},
                               headers=H) as r:  # fmt: skip
                assert r.status == 200, await r.text()
            back = s.patch(url, json={"destination": "/d/moved.bin", "backend": "localfs"},
                           headers=H)  # fmt: skip
            await crash(node, arm, back)
            assert await read(s, node, "/d/moved.bin") == (200, NEW)
            await replica_holds(node, bucket, [len(NEW)])
    finally:
        await asyncio.to_thread(node.stop)
