"""Nodes on HTTPS over one PostgreSQL (issue 6): inter-node traffic verifies the peer's
certificate against ``backend.internal_proxy_ca_file``; a node that does not trust it gets 502."""

from __future__ import annotations

import ssl
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from callfs.tls import generate_self_signed
from cluster_tests.harness import API_KEY, ClusterNode, free_ports, node_config

pytestmark = pytest.mark.slow
H = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


@pytest.fixture
async def database() -> object:
    db = f"callfs_tls_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(ADMIN)
    await conn.execute(f'CREATE DATABASE "{db}"')
    await conn.close()
    yield f"postgresql://postgres@127.0.0.1:5432/{db}"
    conn = await asyncpg.connect(ADMIN)
    await conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
    await conn.close()


@pytest.fixture
def tls_cluster(tmp_path: Path, database: str) -> Iterator[tuple[list[ClusterNode], Path]]:
    cert, key = tmp_path / "tls" / "cluster.crt", tmp_path / "tls" / "cluster.key"
    generate_self_signed(["127.0.0.1", "localhost"], cert, key)
    names = ["tls-a", "tls-b", "tls-c"]
    ports = free_ports(3)
    peers = {n: f"https://127.0.0.1:{p}" for n, p in zip(names, ports, strict=True)}
    nodes = []
    for name, port in zip(names, ports, strict=True):
        cfg = node_config(
            name,
            port,
            tmp_path,
            peers,
            {"type": "postgres", "dsn": database},
            {"type": "redis", "redis_addr": "127.0.0.1:6379"},
        )
        cfg["server"].update(
            protocol="https",
            cert_file=str(cert),
            key_file=str(key),
            external_url=f"https://127.0.0.1:{port}",
        )
        # tls-c does not know the cluster's CA: its calls to other nodes must fail verification
        if name != "tls-c":
            cfg["backend"]["internal_proxy_ca_file"] = str(cert)
        nodes.append(ClusterNode(name, port, tmp_path, cfg))
    try:
        for node in nodes:
            node.start_tls(cert)
        yield nodes, cert
    finally:
        for node in nodes:
            node.stop()


async def test_https_cluster_proxies_with_verified_certificates(
    tls_cluster: tuple[list[ClusterNode], Path],
) -> None:
    (a, b, c), cert = tls_cluster
    ctx = ssl.create_default_context(cafile=str(cert))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
        base_a = f"https://127.0.0.1:{a.port}"
        base_b = f"https://127.0.0.1:{b.port}"
        base_c = f"https://127.0.0.1:{c.port}"
        async with s.put(f"{base_a}/v1/files/secure/x.bin", data=b"over tls", headers=H) as r:
            assert r.status == 201
            assert "Strict-Transport-Security" in r.headers
        async with s.get(f"{base_b}/v1/files/secure/x.bin", headers=H) as r:
            assert r.status == 200 and await r.read() == b"over tls"
        async with s.head(f"{base_b}/v1/files/secure/x.bin", headers=H) as r:
            assert r.status == 200 and r.headers["X-CallFS-Instance-ID"] == "tls-a"
        async with s.put(f"{base_b}/v1/files/secure/x.bin", data=b"updated", headers=H) as r:
            assert r.status == 200
        async with s.get(f"{base_a}/v1/files/secure/x.bin", headers=H) as r:
            assert await r.read() == b"updated"
        # tls-c cannot verify tls-a's certificate: the owner is unreachable for it
        async with s.get(f"{base_c}/v1/files/secure/x.bin", headers=H) as r:
            assert r.status == 502
            assert (await r.json())["code"] == "PEER_UNAVAILABLE"
