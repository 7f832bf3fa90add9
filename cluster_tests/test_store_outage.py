"""Store outages (issue 4): with PostgreSQL or Redis restarted under load, requests get 503
UNAVAILABLE with Retry-After within the op timeout (never a hang, never a 500), /health stays 200,
and the node recovers without a restart.

Each test starts its own private PostgreSQL or Redis (own port, own data directory, see
``callfs.tests.services``) and stops only that one; the machine's shared servers are untouched."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from callfs.tests.services import PrivatePostgres, PrivateRedis, private_postgres, private_redis
from cluster_tests.harness import API_KEY, ClusterNode, free_ports, node_config

pytestmark = pytest.mark.slow
H = {"Authorization": f"Bearer {API_KEY}"}


@dataclass
class Outage:
    node: ClusterNode
    kind: str
    store: PrivatePostgres | PrivateRedis


@pytest.fixture
def outage_node(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Outage]:
    kind = request.param
    with contextlib.ExitStack() as stack:
        store: PrivatePostgres | PrivateRedis
        if kind == "postgres":
            store = stack.enter_context(private_postgres(tmp_path / "store"))
            meta: dict[str, Any] = {"type": "postgres", "dsn": store.dsn}
            dlm: dict[str, Any] = {"type": "local"}
        else:
            store = stack.enter_context(private_redis(tmp_path / "store"))
            meta = {
                "type": "redis",
                "redis_addr": store.addr,
                "redis_key_prefix": f"callfs-outage-{uuid.uuid4().hex[:10]}:",
            }
            dlm = {"type": "redis", "redis_addr": store.addr}
        (port,) = free_ports(1)
        cfg = node_config("solo", port, tmp_path, {"solo": f"http://127.0.0.1:{port}"}, meta, dlm)
        cfg["server"]["metadata_op_timeout"] = "2s"
        cfg["dlm"]["lock_timeout"] = "2s"
        node = ClusterNode("solo", port, tmp_path, cfg)
        try:
            node.start()
            yield Outage(node, kind, store)
        finally:
            node.stop()  # before the store: the ExitStack then stops and removes the store
            print(node.logs())
            print(store.logs())


@pytest.mark.parametrize("outage_node", ["postgres", "redis"], indirect=True)
async def test_outage_gives_503_then_recovers(outage_node: Outage) -> None:
    node, kind, store = outage_node.node, outage_node.kind, outage_node.store
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as s:
        async with s.put(f"{node.base}/v1/files/before.txt", data=b"x", headers=H) as r:
            assert r.status == 201
        await asyncio.to_thread(store.stop)  # only our private server goes down
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
            await asyncio.to_thread(store.start)  # same port and data directory, waits for it
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
