"""Store outages (issue 4): with PostgreSQL or Redis restarted under load, requests get 503
UNAVAILABLE with Retry-After within the op timeout (never a hang, never a 500), /health stays 200,
and the node recovers without a restart. These restart the machine's real servers."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cluster_tests.harness import API_KEY, ClusterNode, free_ports, node_config

pytestmark = pytest.mark.slow
H = {"Authorization": f"Bearer {API_KEY}"}
REDIS_START = [
    "redis-server",
    "--daemonize",
    "yes",
    "--bind",
    "127.0.0.1",
    "-::1",
    "--port",
    "6379",
    "--save",
    "",
    "--appendonly",
    "no",
    "--dir",
    "/var/lib/redis",
    "--logfile",
    "/var/log/redis/ci.log",
]


def pg_cluster() -> list[str]:
    version = sorted(os.listdir("/etc/postgresql"))[0]
    return [version, "main"]


def pg_ctl(action: str) -> None:
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", *pg_cluster(), action], check=True
    )


def redis_stop() -> None:
    subprocess.run(["redis-cli", "-p", "6379", "shutdown", "nosave"], check=False)


def redis_start() -> None:
    os.makedirs("/var/lib/redis", exist_ok=True)
    os.makedirs("/var/log/redis", exist_ok=True)
    subprocess.run(REDIS_START, check=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if subprocess.run(["redis-cli", "ping"], capture_output=True).stdout.strip() == b"PONG":
            return
        time.sleep(0.1)
    raise AssertionError("redis did not come back")


def wait_pg() -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if subprocess.run(["pg_isready", "-h", "127.0.0.1", "-q"]).returncode == 0:
            return
        time.sleep(0.2)
    raise AssertionError("postgres did not come back")


@pytest.fixture
def outage_node(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[ClusterNode, str]]:
    kind = request.param
    (port,) = free_ports(1)
    if kind == "postgres":
        db = f"callfs_outage_{uuid.uuid4().hex[:10]}"
        subprocess.run(
            ["psql", "-h", "127.0.0.1", "-U", "postgres", "-c", f'CREATE DATABASE "{db}"'],
            check=True,
            capture_output=True,
        )
        meta = {"type": "postgres", "dsn": f"postgresql://postgres@127.0.0.1:5432/{db}"}
        dlm: dict[str, Any] = {"type": "local"}
    else:
        meta = {
            "type": "redis",
            "redis_addr": "127.0.0.1:6379",
            "redis_key_prefix": f"callfs-outage-{uuid.uuid4().hex[:10]}:",
        }
        dlm = {"type": "redis", "redis_addr": "127.0.0.1:6379"}
    cfg = node_config("solo", port, tmp_path, {"solo": f"http://127.0.0.1:{port}"}, meta, dlm)
    cfg["server"]["metadata_op_timeout"] = "2s"
    cfg["dlm"]["lock_timeout"] = "2s"
    node = ClusterNode("solo", port, tmp_path, cfg)
    node.start()
    try:
        yield node, kind
    finally:
        node.stop()
        if kind == "postgres":
            wait_pg()
        else:
            redis_start()
        print(node.logs())


@pytest.mark.parametrize("outage_node", ["postgres", "redis"], indirect=True)
async def test_outage_gives_503_then_recovers(outage_node: tuple[ClusterNode, str]) -> None:
    node, kind = outage_node
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as s:
        async with s.put(f"{node.base}/v1/files/before.txt", data=b"x", headers=H) as r:
            assert r.status == 201
        await asyncio.to_thread(pg_ctl if kind == "postgres" else (lambda _: redis_stop()), "stop")
        try:
            statuses = []
            for i in range(6):
                started = time.monotonic()
                async with s.put(f"{node.base}/v1/files/during{i}.txt", data=b"y", headers=H) as r:
                    statuses.append(r.status)
                    body = await r.json()
                    assert r.status == 503, body
                    assert body["code"] == "UNAVAILABLE"
                    assert "Retry-After" in r.headers
                async with s.get(f"{node.base}/v1/files/before.txt", headers=H) as r:
                    assert r.status == 503
                assert time.monotonic() - started < 8  # bounded by the op timeout, no hang
                async with s.get(f"{node.base}/health") as r:
                    assert r.status == 200
        finally:
            if kind == "postgres":
                await asyncio.to_thread(pg_ctl, "start")
                await asyncio.to_thread(wait_pg)
            else:
                await asyncio.to_thread(redis_start)
        # recovers by itself, without restarting the node
        deadline = time.monotonic() + 30
        recovered = False
        while time.monotonic() < deadline:
            async with s.put(f"{node.base}/v1/files/after.txt", data=b"z", headers=H) as r:
                if r.status in (200, 201):
                    recovered = True
                    break
                assert r.status == 503
            await asyncio.sleep(0.5)
        assert recovered
        async with s.get(f"{node.base}/v1/files/after.txt", headers=H) as r:
            assert r.status == 200 and await r.read() == b"z"
        if kind == "postgres":
            async with s.get(f"{node.base}/v1/files/before.txt", headers=H) as r:
                assert r.status == 200  # PostgreSQL keeps data across its restart
