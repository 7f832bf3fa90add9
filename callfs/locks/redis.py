"""Redis locks (``dlm.type: redis``, API.md §14): shared by every node that uses the same Redis.

``SET <prefix><key> <token> NX PX <lease>`` with a random per-process owner plus a per-hold counter
as the token; release and renewal are compare-then-act Lua scripts, so a node never frees or
extends a lock it no longer owns. While held, the lease is renewed every lease/3; if renewal finds
the lock gone (a long pause, a Redis restart) the hold is marked lost and leaving it raises
``Unavailable``, so the caller fails cleanly instead of reporting success for an unprotected write.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from callfs.errors import LockTimeout, Unavailable
from callfs.redisconn import open_redis

log = logging.getLogger(__name__)

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


def redis_cause(exc: BaseException, section: str) -> str:
    """Why a Redis connection failed, in words (never only an exception class)."""
    from redis.exceptions import AuthenticationError, ResponseError

    text = str(exc)
    low = text.lower()
    if isinstance(exc, TimeoutError) or "timeout" in low or "timed out" in low:
        return "timed out (is the address right and the port reachable?)"
    if "connection refused" in low or "connect call failed" in low:
        return "connection refused (is redis-server running and listening there?)"
    if "name or service not known" in low or "nodename nor servname" in low:
        return "host not found"
    if isinstance(exc, AuthenticationError) or "noauth" in low or "wrongpass" in low:
        return f"authentication failed (check {section}.redis_password): {text}"
    if isinstance(exc, ResponseError) and "db index" in low:
        return (
            f"database does not exist on that server ({text}; lower {section}.redis_db or raise "
            "the server's `databases` setting)"
        )
    return text or type(exc).__name__


class RedisLockManager:
    def __init__(
        self,
        addr: str,
        *,
        password: str = "",
        db: int = 0,
        key_prefix: str = "callfs:lock:",
        lease: float = 30.0,
        op_timeout: float = 5.0,
    ) -> None:
        self._addr = addr
        self._password = password
        self._db = db
        self._prefix = key_prefix
        self._lease_ms = int(lease * 1000)
        self._op_timeout = op_timeout
        self._owner = secrets.token_hex(8)
        self._counter = itertools.count()
        self._held = 0
        self._redis: aioredis.Redis | None = None
        self._pool: aioredis.BlockingConnectionPool | None = None
        #: releases of tokens whose SET NX failed or timed out (``_disown``)
        self._disowning: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Connect and PING, so an unreachable lock service fails start-up with its address and
        the cause rather than the first write."""
        self._redis, self._pool = open_redis(
            self._addr, self._password, self._db, timeout=self._op_timeout
        )
        try:
            async with asyncio.timeout(self._op_timeout):
                await self._redis.ping()
        except (RedisError, OSError, TimeoutError) as exc:
            await self.close()
            raise Unavailable(
                f"cannot reach the Redis lock service (dlm) at {self._addr} db {self._db}: "
                f"{redis_cause(exc, 'dlm')}"
            ) from exc

    async def close(self) -> None:
        for task in list(self._disowning):
            task.cancel()
        await asyncio.gather(*self._disowning, return_exceptions=True)
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None
        if self._pool is not None:
            # A pool passed in explicitly is not closed by Redis.aclose().
            await self._pool.aclose()
            self._pool = None

    @property
    def held(self) -> int:
        return self._held

    @property
    def client(self) -> aioredis.Redis:
        if self._redis is None:
            raise Unavailable("lock manager is not running")
        return self._redis

    def hold(self, key: str, timeout: float) -> AbstractAsyncContextManager[None]:
        return self._hold(self._prefix + key, timeout)

    @asynccontextmanager
    async def _hold(self, name: str, wait: float) -> AsyncIterator[None]:
        token = f"{self._owner}:{next(self._counter)}"
        await self._acquire(name, token, wait)
        self._held += 1
        lost = asyncio.Event()
        renewer = asyncio.create_task(self._renew(name, token, lost))
        try:
            yield
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            self._held -= 1
            try:
                released = await self.client.eval(_RELEASE, 1, name, token)
            except RedisError:
                log.warning("could not release a lock; released once Redis answers again")
                self._disown(name, token)  # not left to block the path for its whole lease
                released = 1
            if lost.is_set() or not released:
                raise Unavailable("lock lost while held")

    async def _acquire(self, name: str, token: str, wait: float) -> None:
        deadline = time.monotonic() + wait
        delay = 0.005
        while True:
            try:
                if await self.client.set(name, token, nx=True, px=self._lease_ms):
                    return
            except RedisError as exc:
                # A SET sent to a stalled Redis runs when it wakes: the lock would be held by
                # nobody for a whole lease, every writer of the path refused (found by audit)
                self._disown(name, token)
                raise Unavailable("lock service unavailable") from exc
            except asyncio.CancelledError:  # (a caller's own bound) the same, then cancelled
                self._disown(name, token)
                raise
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LockTimeout()
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.1)

    def _disown(self, name: str, token: str) -> None:
        """Release ``token``'s hold of ``name`` if a SET NX that failed here took it after all:
        tried until the lease would have run out anyway."""

        async def release() -> None:
            deadline = time.monotonic() + self._lease_ms / 1000
            delay = 0.2
            while time.monotonic() < deadline:
                try:
                    await self.client.eval(_RELEASE, 1, name, token)
                    return  # released, or it never was ours: done either way
                except (RedisError, Unavailable):
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)

        task = asyncio.ensure_future(release())
        self._disowning.add(task)
        task.add_done_callback(self._disowning.discard)

    async def _renew(self, name: str, token: str, lost: asyncio.Event) -> None:
        interval = self._lease_ms / 3000
        while True:
            await asyncio.sleep(interval)
            try:
                still_ours = await self.client.eval(_RENEW, 1, name, token, self._lease_ms)
            except RedisError:
                continue  # keep trying until the lease runs out
            if not still_ours:
                log.error("a held lock was lost (lease expired or Redis restarted)")
                lost.set()
                return
