"""Erasure-coded files across three real nodes (issue 12), on a Raft cluster and on a shared
PostgreSQL cluster: shards spread over the nodes, byte-exact reads (whole and ranges) from every
node, reads with a holder killed, 503 with too few holders, a corrupt shard never producing wrong
bytes, delete leaving no shard anywhere, and a large upload with flat server memory."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cluster_tests.harness import (
    API_KEY,
    ClusterNode,
    private_pg_database,
    shared_store_nodes,
)
from cluster_tests.raftlib import raft_cluster, wait_leader

pytestmark = pytest.mark.slow
H = {"Authorization": f"Bearer {API_KEY}"}
LOCAL = {"type": "local"}
ERASURE = {"enabled": True, "data_shards": 2, "parity_shards": 1}


@pytest.fixture
async def pg_store() -> AsyncIterator[dict[str, Any]]:
    async with private_pg_database("erasure") as store:
        yield store


def shared_store_cluster(workdir: Path, store: dict[str, Any]) -> list[ClusterNode]:
    return list(shared_store_nodes(["node-1", "node-2", "node-3"], workdir, store, LOCAL).values())


@pytest.fixture
def pg_cluster(tmp_path: Path, pg_store: dict[str, Any]) -> Iterator[list[ClusterNode]]:
    """Three started nodes on a private PostgreSQL database, erasure coding on."""
    nodes = shared_store_cluster(tmp_path, pg_store)
    for node in nodes:
        node.config["erasure"] = dict(ERASURE)
    try:
        for node in nodes:
            node.start()
        yield nodes
    finally:
        for node in nodes:
            node.stop()


@pytest.fixture(params=["raft", "postgres"])
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[list[ClusterNode]]:
    if request.param == "raft":
        nodes = raft_cluster(tmp_path)
    else:
        store = request.getfixturevalue("pg_store")
        nodes = shared_store_cluster(tmp_path, store)
    for node in nodes:
        node.config["erasure"] = dict(ERASURE)
    try:
        for node in nodes:
            node.start()
        if request.param == "raft":
            wait_leader(nodes)
        yield nodes
    finally:
        for node in nodes:
            node.stop()


def shards_on(workdir: Path, name: str) -> list[Path]:
    root = workdir / name / "files" / ".erasure"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


async def upload(
    s: aiohttp.ClientSession, node: ClusterNode, path: str, data: bytes, k: int, m: int
) -> None:
    headers = {
        **H,
        "X-CallFS-Erasure": "true",
        "X-CallFS-Erasure-Data-Shards": str(k),
        "X-CallFS-Erasure-Parity-Shards": str(m),
    }
    async with s.post(f"{node.base}/v1/files{path}", data=io.BytesIO(data), headers=headers) as r:
        assert r.status == 201, await r.text()


async def read(
    s: aiohttp.ClientSession, node: ClusterNode, path: str, rng: str | None = None
) -> tuple[int, bytes]:
    headers = {**H, "Range": rng} if rng else H
    async with s.get(f"{node.base}/v1/files{path}", headers=headers) as r:
        return r.status, await r.read()


@pytest.mark.parametrize(("k", "m"), [(2, 1), (4, 2)])
async def test_exact_reads_from_every_node_and_with_a_holder_down(
    cluster: list[ClusterNode], tmp_path: Path, k: int, m: int
) -> None:
    data = os.urandom(3 * 1024 * 1024 + 4321)
    async with aiohttp.ClientSession() as s:
        await upload(s, cluster[1], "/ec/file.bin", data, k, m)
        # shard 0 on the receiving node, then round-robin over the others: every node holds some
        counts = [len(shards_on(tmp_path, n.name)) for n in cluster]
        assert sum(counts) == k + m and all(counts), counts
        for node in cluster:
            assert await read(s, node, "/ec/file.bin") == (200, data)
            for a, b in [(0, 99), (1_000_000, 2_500_000), (len(data) - 10, len(data) - 1)]:
                status, got = await read(s, node, "/ec/file.bin", f"bytes={a}-{b}")
                assert (status, got) == (206, data[a : b + 1]), (node.name, a, b)
        async with s.get(f"{cluster[2].base}/v1/files/ec/file.bin?manifest=true", headers=H) as r:
            manifest = await r.json(content_type=None)
        for shard in manifest["shards"]:  # each endpoint serves its shard to a normal key
            async with s.get(shard["endpoint"], headers=H) as r:
                assert r.status == 200
                assert hashlib.sha256(await r.read()).hexdigest() == shard["checksum"]
        # a holder killed: still byte-exact from the survivors (m >= 1 shard per node here)
        victim = cluster[2] if k == 2 else cluster[0]
        victim.kill()
        survivors = [n for n in cluster if n is not victim]
        deadline = time.monotonic() + 20
        for node in survivors:
            while True:
                status, got = await read(s, node, "/ec/file.bin")
                if status != 503 or time.monotonic() > deadline:  # Raft: a new leader first
                    break
            assert (status, got) == (200, data), node.name
            status, got = await read(s, node, "/ec/file.bin", "bytes=5-500004")
            assert (status, got) == (206, data[5:500005])


async def test_delete_and_overwrite_leave_no_shard_behind(
    cluster: list[ClusterNode], tmp_path: Path
) -> None:
    one, two = os.urandom(1_500_000), os.urandom(700_000)
    async with aiohttp.ClientSession() as s:
        await upload(s, cluster[0], "/ec/d.bin", one, 2, 1)
        first = {n.name: shards_on(tmp_path, n.name) for n in cluster}
        async with s.put(
            f"{cluster[1].base}/v1/files/ec/d.bin", data=io.BytesIO(two), headers=H
        ) as r:
            assert r.status == 200, await r.text()
        for node in cluster:
            assert await read(s, node, "/ec/d.bin") == (200, two)
        second = {n.name: shards_on(tmp_path, n.name) for n in cluster}
        assert sum(len(v) for v in second.values()) == 3
        assert not any(set(first[n]) & set(second[n]) for n in first)  # old shards gone
        async with s.delete(f"{cluster[2].base}/v1/files/ec/d.bin", headers=H) as r:
            assert r.status == 204
        assert all(shards_on(tmp_path, n.name) == [] for n in cluster)
        for node in cluster:
            assert (await read(s, node, "/ec/d.bin"))[0] == 404


async def test_a_corrupt_shard_on_disk_never_gives_wrong_bytes(
    cluster: list[ClusterNode], tmp_path: Path
) -> None:
    data = os.urandom(2 * 1024 * 1024)
    async with aiohttp.ClientSession() as s:
        await upload(s, cluster[0], "/ec/c.bin", data, 2, 1)
        victim = shards_on(tmp_path, cluster[1].name)[0]
        raw = bytearray(victim.read_bytes())
        for i in range(0, len(raw), 4096):  # damage every block of that shard
            raw[i] ^= 0x5A
        victim.write_bytes(bytes(raw))
        for node in cluster:
            assert await read(s, node, "/ec/c.bin") == (200, data), node.name


async def test_too_few_holders_answers_503(tmp_path: Path, pg_cluster: list[ClusterNode]) -> None:
    nodes = pg_cluster
    data = os.urandom(600_000)
    async with aiohttp.ClientSession() as s:
        await upload(s, nodes[0], "/ec/x.bin", data, 2, 1)
        nodes[1].kill()
        nodes[2].kill()
        async with s.get(f"{nodes[0].base}/v1/files/ec/x.bin", headers=H) as r:
            assert r.status == 503
            assert (await r.json())["code"] == "INSUFFICIENT_SHARDS"
        # an upload that cannot place its shards fails cleanly: nothing stays on node-1
        before = shards_on(tmp_path, "node-1")
        headers = {**H, "X-CallFS-Erasure": "true"}
        async with s.post(
            f"{nodes[0].base}/v1/files/ec/y.bin", data=b"abc" * 1000, headers=headers
        ) as r:
            assert r.status == 502, await r.text()
        assert shards_on(tmp_path, "node-1") == before
        assert (await read(s, nodes[0], "/ec/y.bin"))[0] == 404


def _rss_peak_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


async def test_a_large_upload_keeps_server_memory_flat(tmp_path: Path) -> None:
    nodes = raft_cluster(tmp_path)
    for node in nodes:
        node.config["erasure"] = dict(ERASURE)
    try:
        for node in nodes:
            node.start()
        wait_leader(nodes)
        receiver = nodes[0]
        assert receiver.proc is not None
        before = _rss_peak_kib(receiver.proc.pid)
        size = 512 * 1024 * 1024
        digest = hashlib.sha256()

        async def body() -> AsyncIterator[bytes]:
            chunk = os.urandom(1024 * 1024)
            for i in range(size // len(chunk)):
                piece = chunk[:8] + i.to_bytes(8, "big") + chunk[16:]
                digest.update(piece)
                yield piece

        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(timeout=timeout) as s:
            headers = {**H, "X-CallFS-Erasure": "true"}
            async with s.post(
                f"{receiver.base}/v1/files/big.bin", data=body(), headers=headers
            ) as r:
                assert r.status == 201, await r.text()
            peak = _rss_peak_kib(receiver.proc.pid)
            got = hashlib.sha256()
            async with s.get(f"{nodes[1].base}/v1/files/big.bin", headers=H) as r:
                assert r.status == 200
                async for chunk in r.content.iter_chunked(1 << 20):
                    got.update(chunk)
        assert got.hexdigest() == digest.hexdigest()
        grew_mib = (peak - before) / 1024
        print(f"receiver peak RSS grew {grew_mib:.1f} MiB for a 512 MiB erasure upload")
        assert grew_mib < 100
    finally:
        for node in nodes:
            node.stop()


def repair_cli(workdir: Path, node: ClusterNode, *args: str) -> dict[str, Any]:
    import json
    import subprocess
    import sys

    from cluster_tests.harness import INTERNAL

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "callfs",
            "erasure",
            "repair",
            *args,
            "--json",
            "--url",
            node.base,
            "--internal-secret",
            INTERNAL,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=workdir,
    )
    report: dict[str, Any] = json.loads(out.stdout)
    report["exit"] = out.returncode
    return report


async def holders(s: aiohttp.ClientSession, node: ClusterNode, path: str) -> list[str]:
    """The node (API base) of each shard of ``path``, in index order, from its manifest."""
    async with s.get(f"{node.base}/v1/files{path}?manifest=true", headers=H) as r:
        manifest = await r.json(content_type=None)
    return [sh["endpoint"].split("/v1/shards/")[0] for sh in manifest["shards"]]


async def test_automatic_repair_restores_full_redundancy(tmp_path: Path) -> None:
    """A node's data directory is wiped while it is down: the automatic pass leaves its shards
    to it (a down holder is lost only after ``DOWN_GRACE``) and rebuilds them there once it is
    back. Then a node is lost for good: an operator's repair rebuilds its shards on the
    survivors. When it comes back, the automatic pass spreads the files over three nodes again.
    (A review found a pass that ran while a holder restarted moved its shards to the others for
    good: 2+1 files with two shards on one node, lost with the next single failure.)"""
    nodes = raft_cluster(tmp_path)
    for node in nodes:
        node.config["erasure"] = {**ERASURE, "repair_interval": "1s"}
    files = {f"/heal/{i}.bin": os.urandom(300_000 + i * 7919) for i in range(10)}
    try:
        for node in nodes:
            node.start()
        wait_leader(nodes)
        async with aiohttp.ClientSession() as s:
            for i, (path, data) in enumerate(files.items()):
                await upload(s, nodes[i % 3], path, data, 2, 1)
            lost = len(shards_on(tmp_path, "node-3"))
            assert lost >= 10
            # wipe node-3's files while it is down, then bring it back empty
            import shutil

            nodes[2].kill()
            shutil.rmtree(tmp_path / "node-3" / "files")
            nodes[2].start()
            started = time.monotonic()
            deadline = started + 90
            # every file back to k+m intact shards, node-3's on node-3 again (passes ran while
            # it was down: the interval is 1 s)
            while len(shards_on(tmp_path, "node-3")) < lost:
                assert time.monotonic() < deadline, "automatic repair did not restore the shards"
                await asyncio.sleep(0.5)
            names = ("node-1", "node-2", "node-3")
            assert sum(len(shards_on(tmp_path, n)) for n in names) == 3 * len(files)
            print(f"rebuilt {lost} shards of a wiped node in {time.monotonic() - started:.1f}s")
            report = repair_cli(tmp_path, nodes[0])
            assert (report["healthy"], report["exit"]) == (10, 0), report
            # node-3 gone for good: its shards move to the survivors
            nodes[2].kill()
            leader = wait_leader(nodes[:2], timeout=20)
            started = time.monotonic()
            while True:
                report = repair_cli(tmp_path, leader)
                if report.get("healthy") == 10:
                    break
                assert time.monotonic() < started + 120, report
                await asyncio.sleep(1.0)
            print(f"re-homed the lost node's shards in {time.monotonic() - started:.1f}s")
            for path, data in files.items():
                for node in nodes[:2]:
                    assert await read(s, node, path) == (200, data)
            # full redundancy without node-3: any one more shard may go and reads still work
            assert sum(len(shards_on(tmp_path, n)) for n in ("node-1", "node-2")) >= 30
            # node-3 back (its old shard files still there): spread over three nodes again
            nodes[2].start()
            started = time.monotonic()
            for path in files:
                while len(set(await holders(s, leader, path))) < 3:
                    assert time.monotonic() < started + 60, await holders(s, leader, path)
                    await asyncio.sleep(0.5)
            print(f"spread the files over three nodes again in {time.monotonic() - started:.1f}s")
            for path, data in files.items():
                assert await read(s, nodes[2], path) == (200, data)
    finally:
        for node in nodes:
            node.stop()


async def test_a_frozen_holder_is_read_around(pg_cluster: list[ClusterNode]) -> None:
    """From an erasure audit: a holder of a data shard that is frozen (SIGSTOP), not dead, held
    every read until the whole open timed out (503 after server.file_op_timeout, 10 s), from
    every node, parity unused. Its shard now counts as missing after SHARD_WAIT."""
    from callfs.erasure.service import SHARD_WAIT

    nodes = pg_cluster

    data = os.urandom(2 * 1024 * 1024 + 777)
    async with aiohttp.ClientSession() as s:
        # shard 0 (data) on node-1, shard 1 (data) on node-2, shard 2 (parity) on node-3
        headers = {**H, "X-CallFS-Erasure-Instances": "node-2,node-3"}
        async with s.post(
            f"{nodes[0].base}/v1/files/ec/f.bin?erasure=true&data_shards=2&parity_shards=1",
            data=io.BytesIO(data),
            headers=headers,
        ) as r:
            assert r.status == 201, await r.text()
        async with s.get(f"{nodes[0].base}/v1/files/ec/f.bin?manifest=true", headers=H) as r:
            manifest = await r.json(content_type=None)
        holders = [
            next(n.name for n in nodes if sh["endpoint"].startswith(n.base + "/"))
            for sh in manifest["shards"]
        ]
        assert holders == ["node-1", "node-2", "node-3"], holders
        assert nodes[1].proc is not None
        nodes[1].proc.send_signal(signal.SIGSTOP)
        try:
            for node in (nodes[0], nodes[2]):
                started = time.monotonic()
                assert await read(s, node, "/ec/f.bin") == (200, data), node.name
                status, got = await read(s, node, "/ec/f.bin", "bytes=10-1500000")
                assert (status, got) == (206, data[10:1500001])
                assert time.monotonic() - started < 4 * SHARD_WAIT + 2
        finally:
            nodes[1].proc.send_signal(signal.SIGCONT)


async def test_shards_in_a_shared_bucket_survive_fsck_repair_and_a_repair_spread(
    tmp_path: Path, pg_store: dict[str, Any]
) -> None:
    """``erasure.shard_backend: s3``: every node keeps its shards in one bucket, under keys
    that do not name the node. Found by audit: ``fsck --repair`` took the other nodes' shards
    for strays and removed them (18 of 24 files unreadable), and a repair that spread shards
    back to a returning node wrote each one's object again, then removed it."""
    import json
    import subprocess
    import sys

    from callfs.tests import s3server
    from cluster_tests.harness import INTERNAL

    bucket = s3server.make_bucket()
    s3 = {
        "s3_bucket_name": bucket,
        "s3_endpoint": s3server.endpoint(),
        "s3_access_key": "testing",
        "s3_secret_key": "testing",
    }
    nodes = shared_store_cluster(tmp_path, pg_store)
    for node in nodes:
        node.config["backend"].update(s3)
        node.config["erasure"] = {**ERASURE, "shard_backend": "s3"}

    def objects() -> int:
        listed = s3server.client().list_objects_v2(Bucket=bucket, Prefix=".erasure/")
        return len(listed.get("Contents", []))

    files = {f"/sb/f{i}.bin": os.urandom(50_000 + i) for i in range(6)}
    try:
        for node in nodes:
            node.start()
        async with aiohttp.ClientSession() as s:
            for i, (path, body) in enumerate(files.items()):
                await upload(s, nodes[i % 3], path, body, 2, 1)
            assert objects() == 3 * len(files)
            fsck = subprocess.run(
                [sys.executable, "-m", "callfs", "fsck", "--json", "--repair", "--grace", "0",
                 "--url", nodes[0].base, "--internal-secret", INTERNAL],
                capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip
            report = json.loads(fsck.stdout)
            assert report["counts"].get("orphan", 0) == 0, report
            assert objects() == 3 * len(files)
            # a holder down, the operator's repair rebuilds its shards on the others (the same
            # keys in the bucket); back up, a repair would spread them back to it
            nodes[2].stop()
            assert repair_cli(tmp_path, nodes[0])["exit"] == 0
            nodes[2].start()
            await asyncio.sleep(3)  # past the live-node probe cache (2 s)
            repair_cli(tmp_path, nodes[0])
            assert objects() == 3 * len(files)
            for node in nodes:
                for path, body in files.items():
                    assert await read(s, node, path) == (200, body), (node.name, path)
    finally:
        for node in nodes:
            node.stop()
