"""One way to open a Redis connection pool (shared by the Redis metadata store and Redis locks)."""

from __future__ import annotations

import redis.asyncio as aioredis


def split_addr(addr: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) -> (host, port); the port defaults to 6379."""
    host, _, port = addr.rpartition(":")
    return (host.strip("[]") or "localhost"), int(port or 6379)


def open_redis(
    addr: str, password: str = "", db: int = 0, timeout: float = 5.0
) -> tuple[aioredis.Redis, aioredis.BlockingConnectionPool]:
    """A client on a blocking pool (the default pool raises when exhausted instead of waiting).
    Close both: ``Redis.aclose()`` does not close a pool it was given."""
    host, port = split_addr(addr)
    pool = aioredis.BlockingConnectionPool(
        host=host,
        port=port,
        password=password or None,
        db=db,
        max_connections=64,
        timeout=timeout,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
    )
    return aioredis.Redis(connection_pool=pool), pool
