"""The WorkQueue in Redis: ``P w:<id>`` hashes (kind, key, arg, attempts, owner) and the sorted set
``P W`` of item ids scored by the time each is due (0: never leased). A claim is one Lua script, so
two workers never lease the same item (a renewal too, so it never extends an item just claimed by
another); ids are zero-padded so equal scores keep queue order."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from callfs.jobs.base import WorkItem
from callfs.metadata.redis import RedisMetadataStore

# KEYS: due set. ARGV: prefix, worker, now, lease until, limit.
_CLAIM = """
local p, worker = ARGV[1], ARGV[2]
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[3], 'LIMIT', 0, tonumber(ARGV[5]))
local out = {}
for _, id in ipairs(ids) do
  local key = p .. 'w:' .. id
  redis.call('ZADD', KEYS[1], ARGV[4], id)
  redis.call('HSET', key, 'owner', worker)
  local attempts = redis.call('HINCRBY', key, 'attempts', 1)
  local f = redis.call('HMGET', key, 'kind', 'key', 'arg')
  table.insert(out, {id, f[1], f[2], f[3], attempts})
end
return out
"""
# KEYS: due set. ARGV: prefix, worker, 'ack' or a due time, ids...
_SETTLE = """
local p, worker, what = ARGV[1], ARGV[2], ARGV[3]
for i = 4, #ARGV do
  local key = p .. 'w:' .. ARGV[i]
  if redis.call('HGET', key, 'owner') == worker then
    if what == 'ack' then
      redis.call('DEL', key)
      redis.call('ZREM', KEYS[1], ARGV[i])
    else
      redis.call('HDEL', key, 'owner')
      redis.call('ZADD', KEYS[1], what, ARGV[i])
    end
  end
end
return 1
"""

# KEYS: due set. ARGV: prefix, worker, lease until, ids... Returns the ids renewed.
_RENEW = """
local p, worker = ARGV[1], ARGV[2]
local out = {}
for i = 4, #ARGV do
  if redis.call('HGET', p .. 'w:' .. ARGV[i], 'owner') == worker then
    redis.call('ZADD', KEYS[1], 'XX', ARGV[3], ARGV[i])
    table.insert(out, ARGV[i])
  end
end
return out
"""


def _member(item_id: int) -> str:
    return f"{item_id:020d}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisWorkQueue:
    def __init__(self, store: RedisMetadataStore) -> None:
        self._store = store
        self._p = store.p

    async def start(self) -> None:
        return None  # the store's lifecycle owns the connection pool

    async def close(self) -> None:
        return None

    async def enqueue(self, kind: str, key: str, arg: str, now: float) -> None:
        r = self._store.r
        item_id = await self._store.call(r.incr(f"{self._p}wid"))
        pipe = r.pipeline(transaction=True)
        pipe.hset(
            f"{self._p}w:{_member(item_id)}",
            items=["kind", kind, "key", key, "arg", arg, "at", repr(now), "attempts", 0],
        )
        pipe.zadd(f"{self._p}W", {_member(item_id): 0})
        await self._store.call(pipe.execute())

    async def claim(self, worker: str, limit: int, lease: float, now: float) -> list[WorkItem]:
        rows = await self._store.call(
            self._store.r.eval(
                _CLAIM, 1, f"{self._p}W", self._p, worker, repr(now), repr(now + lease), limit
            )
        )
        return [
            WorkItem(int(_text(r[0])), _text(r[1]), _text(r[2]), _text(r[3]), int(r[4]))
            for r in rows
        ]

    async def renew(self, worker: str, ids: Sequence[int], lease: float, now: float) -> list[int]:
        if not ids:
            return []
        members = [_member(i) for i in sorted(set(ids))]
        rows = await self._store.call(
            self._store.r.eval(
                _RENEW, 1, f"{self._p}W", self._p, worker, repr(now + lease), *members
            )
        )
        return [int(_text(r)) for r in rows]

    async def _settle(self, worker: str, ids: Sequence[int], what: str) -> None:
        if not ids:
            return
        members = [_member(i) for i in ids]
        await self._store.call(
            self._store.r.eval(_SETTLE, 1, f"{self._p}W", self._p, worker, what, *members)
        )

    async def ack(self, worker: str, ids: Sequence[int]) -> None:
        await self._settle(worker, ids, "ack")

    async def retry(self, worker: str, ids: Sequence[int], not_before: float) -> None:
        await self._settle(worker, ids, repr(not_before))

    async def backlog(self) -> int:
        return int(await self._store.call(self._store.r.zcard(f"{self._p}W")))
