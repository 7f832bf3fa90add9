"""Builders for every implementation of each seam. A contract suite runs on all of them; a new
implementation joins by adding a branch here. A module that is missing makes its parametrisation
fail (ImportError), never skip. ``CALLFS_CONTRACT_KINDS=sqlite,local`` narrows the kinds locally."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from callfs.locks.base import LockManager
from callfs.metadata.base import MetadataStore
from callfs.storage.base import StorageBackend
from callfs.tests.services import free_port

METADATA_KINDS = ["sqlite", "postgres", "redis", "raft"]
LOCK_KINDS = ["local", "redis"]
STORAGE_KINDS = ["localfs", "s3"]
PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_ADDR = "127.0.0.1:6379"


def selected(kinds: list[str]) -> list[str]:
    wanted = os.environ.get("CALLFS_CONTRACT_KINDS")
    if not wanted:
        return kinds
    chosen = {k.strip() for k in wanted.split(",")}
    return [k for k in kinds if k in chosen]


@dataclass
class StoreHandle:
    store: MetadataStore
    reopen: Callable[[], Awaitable[MetadataStore]]


@asynccontextmanager
async def make_metadata_store(kind: str, tmp_path: Path) -> AsyncIterator[StoreHandle]:
    if kind == "sqlite":
        async with _sqlite(tmp_path) as handle:
            yield handle
    elif kind == "postgres":
        async with _postgres() as handle:
            yield handle
    elif kind == "redis":
        async with _redis() as handle:
            yield handle
    elif kind == "raft":
        async with _raft(tmp_path) as handle:
            yield handle
    else:
        raise ValueError(kind)


@asynccontextmanager
async def _managed(build: Callable[[], MetadataStore]) -> AsyncIterator[StoreHandle]:
    opened: list[MetadataStore] = []

    async def reopen() -> MetadataStore:
        await opened[-1].close()
        store = build()
        await store.start()
        opened.append(store)
        return store

    first = build()
    await first.start()
    opened.append(first)
    try:
        yield StoreHandle(first, reopen)
    finally:
        await opened[-1].close()


@asynccontextmanager
async def _sqlite(tmp_path: Path) -> AsyncIterator[StoreHandle]:
    from callfs.metadata.sqlite import SqliteMetadataStore

    path = str(tmp_path / "meta.sqlite3")
    async with _managed(lambda: SqliteMetadataStore(path)) as handle:
        yield handle


@asynccontextmanager
async def _raft(tmp_path: Path) -> AsyncIterator[StoreHandle]:
    """A one-node Raft group (real pysyncobj, real journal and snapshots); ``reopen`` restarts
    it from its own log."""
    from callfs.tests.raftnode import one_node_raft_store

    port = free_port()
    async with _managed(lambda: one_node_raft_store(tmp_path / "raft", port)) as handle:
        yield handle


@asynccontextmanager
async def _postgres() -> AsyncIterator[StoreHandle]:
    import asyncpg

    from callfs.metadata.postgres import PostgresMetadataStore

    db = f"callfs_contract_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    await admin.execute(f'CREATE DATABASE "{db}"')
    await admin.close()
    dsn = f"postgresql://postgres@127.0.0.1:5432/{db}"
    try:
        async with _managed(lambda: PostgresMetadataStore(dsn)) as handle:
            yield handle
    finally:
        admin = await asyncpg.connect(PG_ADMIN_DSN)
        await admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        await admin.close()


async def _drop_redis_prefix(prefix: str) -> None:
    import redis.asyncio as aioredis

    r = aioredis.Redis(host="127.0.0.1", port=6379)
    try:
        keys = [k async for k in r.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await r.delete(*keys)
    finally:
        await r.aclose()


@asynccontextmanager
async def _redis() -> AsyncIterator[StoreHandle]:
    from callfs.metadata.redis import RedisMetadataStore

    prefix = f"callfs-contract-{uuid.uuid4().hex[:12]}:"
    try:
        async with _managed(lambda: RedisMetadataStore(REDIS_ADDR, key_prefix=prefix)) as handle:
            yield handle
    finally:
        await _drop_redis_prefix(prefix)


@asynccontextmanager
async def make_lock_manager(kind: str) -> AsyncIterator[LockManager]:
    if kind == "local":
        from callfs.locks.local import LocalLockManager

        manager: LockManager = LocalLockManager()
        prefix = ""
    elif kind == "redis":
        from callfs.locks.redis import RedisLockManager

        prefix = f"callfs-contract-lock-{uuid.uuid4().hex[:12]}:"
        manager = RedisLockManager(REDIS_ADDR, key_prefix=prefix)
    else:
        raise ValueError(kind)
    await manager.start()
    try:
        yield manager
    finally:
        await manager.close()
        if prefix:
            await _drop_redis_prefix(prefix)


@asynccontextmanager
async def make_storage(kind: str, tmp_path: Path) -> AsyncIterator[StorageBackend]:
    if kind == "localfs":
        from callfs.storage.localfs import LocalFSBackend

        backend: StorageBackend = LocalFSBackend(str(tmp_path / "root"))
        await backend.start()
        try:
            yield backend
        finally:
            await backend.close()
    elif kind == "s3":
        from callfs.tests.s3server import s3_backend

        async with s3_backend() as backend:
            yield backend
    else:
        raise ValueError(kind)
