"""Redis metadata store (redis-py asyncio): one namespace shared by a cluster.

Data model (``P`` = ``redis_key_prefix``):
- ``P e:<path>``: a hash per entry (``t`` type, ``s`` size, ``o`` owner, ``m`` mtime, ``b`` backend,
  ``i`` owner node, absent for none, ``v`` version, ``c`` created, ``x`` erasure flag);
- ``P c:<dir>``: a sorted set of the directory's children, all with score 0, members ``0<name>`` for
  files and ``1<name>`` for directories: Redis orders equal scores by member bytes, which is exactly
  the contract order (files first, then code-point order), so a listing is one ZRANGE, O(children);
- ``P l:<token>`` link hashes and the set ``P L`` of all tokens (for the sweep);
- ``P x:<path>`` erasure layouts as msgpack.

Every multi-key change (create-if-absent + parent set, update-if-version, delete, subtree delete and
rename, link consume, sweep) is one Lua script, so it is atomic. A recursive listing costs two round
trips per tree level (children sets, then their hashes), never one per entry.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from dataclasses import replace
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from callfs.errors import (
    AlreadyExists,
    NotFound,
    PermissionDenied,
    Unavailable,
    VersionConflict,
)
from callfs.metadata.base import order_tree
from callfs.metadata.sqlite import pack_layout, unpack_layout
from callfs.model import (
    ROOT_OWNER,
    BackendType,
    Entry,
    EntryType,
    ErasureLayout,
    Link,
    LinkStatus,
    name_of,
    parent_of,
)
from callfs.redisconn import open_redis

T = TypeVar("T")

# KEYS: entry, parent set. ARGV: member, then field/value pairs. 1 created, 0 exists.
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
if ARGV[1] ~= '' then redis.call('ZADD', KEYS[2], 0, ARGV[1]) end
return 1
"""
# KEYS: entry. ARGV: expected version, new version, fields... 1 ok, 0 conflict, -1 missing.
_UPDATE = """
local v = redis.call('HGET', KEYS[1], 'v')
if not v then return -1 end
if v ~= ARGV[1] then return 0 end
redis.call('HDEL', KEYS[1], 'i')
redis.call('HSET', KEYS[1], 'v', ARGV[2], unpack(ARGV, 3))
return 1
"""
# KEYS: entry, parent set. ARGV: member, expected version or ''. 1 ok, 0 conflict, -1 missing.
_DELETE = """
local v = redis.call('HGET', KEYS[1], 'v')
if not v then return -1 end
if ARGV[2] ~= '' and v ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""
# Walk a subtree through the children sets. ARGV: prefix, path.
_WALK = """
local function child(dir, name)
  if dir == '/' then return '/' .. name end
  return dir .. '/' .. name
end
local function walk(p, top, visit)
  local stack = {top}
  while #stack > 0 do
    local dir = table.remove(stack)
    for _, m in ipairs(redis.call('ZRANGE', p .. 'c:' .. dir, 0, -1)) do
      local path = child(dir, string.sub(m, 2))
      visit(path)
      if string.sub(m, 1, 1) == '1' then table.insert(stack, path) end
    end
  end
end
"""
# Delete every descendant of ARGV[2] (not the path itself); return [path, fields...] per entry.
_DELETE_TREE = (
    _WALK
    + """
local p, top = ARGV[1], ARGV[2]
local out, dirs = {}, {top}
walk(p, top, function(path)
  table.insert(out, path)
  table.insert(out, redis.call('HGETALL', p .. 'e:' .. path))
  table.insert(dirs, path)
end)
for i = 1, #out, 2 do redis.call('DEL', p .. 'e:' .. out[i]) end
for _, d in ipairs(dirs) do redis.call('DEL', p .. 'c:' .. d) end
return out
"""
)
# Re-key ARGV[2] and its subtree to ARGV[3]. ARGV[4], ARGV[5]: old and new parent sets' members
# (computed by the caller). -1 src missing, 0 dst exists, 1 ok.
_MOVE_TREE = (
    _WALK
    + """
local p, src, dst = ARGV[1], ARGV[2], ARGV[3]
local function parent(path)
  local head = string.match(path, '^(.*)/[^/]*$')
  if head == nil or head == '' then return '/' end
  return head
end
if redis.call('EXISTS', p .. 'e:' .. src) == 0 then return -1 end
if redis.call('EXISTS', p .. 'e:' .. dst) == 1 then return 0 end
local kind = redis.call('HGET', p .. 'e:' .. src, 't')
local paths = {src}
walk(p, src, function(path) table.insert(paths, path) end)
for _, old in ipairs(paths) do
  local new = dst .. string.sub(old, #src + 1)
  redis.call('RENAME', p .. 'e:' .. old, p .. 'e:' .. new)
  redis.call('HINCRBY', p .. 'e:' .. new, 'v', 1)
  if redis.call('EXISTS', p .. 'c:' .. old) == 1 then
    redis.call('RENAME', p .. 'c:' .. old, p .. 'c:' .. new)
  end
end
local flag = '0'
if kind == 'directory' then flag = '1' end
redis.call('ZREM', p .. 'c:' .. parent(src), flag .. ARGV[4])
redis.call('ZADD', p .. 'c:' .. parent(dst), 0, flag .. ARGV[5])
return 1
"""
)
_CONSUME = """
if redis.call('HGET', KEYS[1], 'status') ~= 'active' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'used', 'used_at', ARGV[1], 'used_by_ip', ARGV[2])
return 1
"""
# ARGV: prefix, now, used_before.
_SWEEP = """
local p, now, before = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local removed = 0
for _, token in ipairs(redis.call('SMEMBERS', p .. 'L')) do
  local key = p .. 'l:' .. token
  local st = redis.call('HMGET', key, 'status', 'expires_at', 'used_at')
  local gone = st[1] == false
  if not gone and st[1] == 'active' and tonumber(st[2]) <= now then gone = true end
  if not gone and st[1] == 'used' and st[3] and tonumber(st[3]) < before then gone = true end
  if gone then
    if st[1] ~= false then removed = removed + 1 end
    redis.call('DEL', key)
    redis.call('SREM', p .. 'L', token)
  end
end
return removed
"""


def _member(entry_type: EntryType, path: str) -> str:
    return ("1" if entry_type is EntryType.DIRECTORY else "0") + name_of(path)


def _fields(e: Entry) -> list[str | int]:
    out: list[str | int] = [
        "t",
        e.type.value,
        "s",
        e.size,
        "o",
        e.owner,
        "m",
        e.mtime,
        "b",
        e.backend_type.value,
        "c",
        e.created_at,
        "x",
        int(e.erasure_coded),
    ]
    if e.instance_id is not None:
        out += ["i", e.instance_id]
    return out


def _decode(path: str, raw: dict[Any, Any] | list[Any]) -> Entry:
    if isinstance(raw, list):
        raw = dict(zip(raw[::2], raw[1::2], strict=True))
    h = {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}

    def text(name: str) -> str:
        value = h[name]
        return value.decode() if isinstance(value, bytes) else str(value)

    return Entry(
        path=path,
        type=EntryType(text("t")),
        size=int(text("s")),
        owner=text("o"),
        mtime=int(text("m")),
        backend_type=BackendType(text("b")),
        instance_id=text("i") if "i" in h else None,
        version=int(text("v")),
        created_at=int(text("c")),
        erasure_coded=text("x") == "1",
    )


class RedisMetadataStore:
    def __init__(
        self,
        addr: str,
        *,
        password: str = "",
        db: int = 0,
        key_prefix: str = "callfs:",
        op_timeout: float = 5.0,
    ) -> None:
        self._addr = addr
        self._password = password
        self._db = db
        self.p = key_prefix
        self._timeout = op_timeout
        self._redis: aioredis.Redis | None = None
        self._pool: aioredis.BlockingConnectionPool | None = None

    async def start(self) -> None:
        self._redis, self._pool = open_redis(self._addr, self._password, self._db, self._timeout)
        root = Entry(
            path="/",
            type=EntryType.DIRECTORY,
            size=0,
            owner=ROOT_OWNER,
            mtime=0,
            backend_type=BackendType.LOCALFS,
            instance_id=None,
        )
        await self._call(
            self.r.eval(_CREATE, 2, self._e("/"), self._c("/"), "", *_fields(root), "v", 1)
        )

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None
        if self._pool is not None:
            await self._pool.aclose()
            self._pool = None

    @property
    def r(self) -> aioredis.Redis:
        if self._redis is None:
            raise Unavailable("metadata store is not running")
        return self._redis

    def _e(self, path: str) -> str:
        return f"{self.p}e:{path}"

    def _c(self, path: str) -> str:
        return f"{self.p}c:{path}"

    async def _call(self, call: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(self._timeout):
                return await call
        except (RedisError, OSError, TimeoutError) as exc:
            if isinstance(exc, ResponseError) and "NOSCRIPT" not in str(exc):
                raise Unavailable("metadata store error") from exc
            raise Unavailable("metadata store unavailable") from exc

    # ---- entries ---------------------------------------------------------------------------
    async def get(self, path: str) -> Entry | None:
        raw = await self._call(self.r.hgetall(self._e(path)))
        return _decode(path, raw) if raw else None

    async def create(self, entry: Entry) -> Entry:
        member = _member(entry.type, entry.path) if entry.path != "/" else ""
        created = await self._call(
            self.r.eval(
                _CREATE,
                2,
                self._e(entry.path),
                self._c(parent_of(entry.path)),
                member,
                *_fields(entry),
                "v",
                1,
            )
        )
        if not created:
            raise AlreadyExists()
        return replace(entry, version=1)

    async def update(self, entry: Entry, expected_version: int) -> Entry:
        old = await self.get(entry.path)
        if old is not None and old.type is not entry.type:
            raise VersionConflict()  # a type change would desynchronise the parent's set
        result = await self._call(
            self.r.eval(
                _UPDATE,
                1,
                self._e(entry.path),
                str(expected_version),
                expected_version + 1,
                *_fields(entry),
            )
        )
        if result == -1:
            raise NotFound()
        if result == 0:
            raise VersionConflict()
        return replace(entry, version=expected_version + 1)

    async def delete(self, path: str, expected_version: int | None = None) -> None:
        if path == "/":
            raise PermissionDenied("the root is never deleted")
        current = await self.get(path)
        if current is None:
            raise NotFound()
        result = await self._call(
            self.r.eval(
                _DELETE,
                2,
                self._e(path),
                self._c(parent_of(path)),
                _member(current.type, path),
                "" if expected_version is None else str(expected_version),
            )
        )
        if result == -1:
            raise NotFound()
        if result == 0:
            raise VersionConflict()

    async def _entries(self, paths: list[str]) -> list[Entry]:
        if not paths:
            return []
        pipe = self.r.pipeline(transaction=False)
        for path in paths:
            pipe.hgetall(self._e(path))
        raws = await self._call(pipe.execute())
        return [_decode(p, raw) for p, raw in zip(paths, raws, strict=True) if raw]

    @staticmethod
    def _child(directory: str, member: Any) -> str:
        return ("" if directory == "/" else directory) + "/" + _s(member)[1:]

    async def list_children(self, path: str) -> list[Entry]:
        members = await self._call(self.r.zrange(self._c(path), 0, -1))
        return await self._entries([self._child(path, m) for m in members])

    async def has_children(self, path: str) -> bool:
        return bool(await self._call(self.r.zcard(self._c(path))))

    async def list_tree(self, path: str, max_depth: int) -> list[Entry]:
        found: list[Entry] = []
        level = [path]
        for _ in range(max_depth + 1):
            if not level:
                break
            pipe = self.r.pipeline(transaction=False)
            for directory in level:
                pipe.zrange(self._c(directory), 0, -1)
            member_lists = await self._call(pipe.execute())
            children = [
                self._child(d, m) for d, ms in zip(level, member_lists, strict=True) for m in ms
            ]
            entries = await self._entries(children)
            found.extend(entries)
            level = [e.path for e in entries if e.is_dir]
        return order_tree(path, found, max_depth)

    async def delete_tree(self, path: str) -> list[Entry]:
        out = await self._call(self.r.eval(_DELETE_TREE, 0, self.p, path))
        removed = [
            _decode(p.decode() if isinstance(p, bytes) else p, raw)
            for p, raw in zip(out[::2], out[1::2], strict=True)
        ]
        removed.sort(key=lambda e: e.path.count("/"), reverse=True)
        return removed

    async def move_tree(self, src: str, dst: str) -> None:
        result = await self._call(
            self.r.eval(_MOVE_TREE, 0, self.p, src, dst, name_of(src), name_of(dst))
        )
        if result == -1:
            raise NotFound()
        if result == 0:
            raise AlreadyExists()

    # ---- links -----------------------------------------------------------------------------
    def _l(self, token: str) -> str:
        return f"{self.p}l:{token}"

    async def create_link(self, link: Link) -> None:
        items: list[str] = [
            "path",
            link.path,
            "status",
            link.status.value,
            "expires_at",
            repr(link.expires_at),
            "created_at",
            repr(link.created_at),
            "signature",
            link.signature,
        ]
        if link.used_at is not None:
            items += ["used_at", repr(link.used_at)]
        if link.used_by_ip is not None:
            items += ["used_by_ip", link.used_by_ip]
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self._l(link.token), items=items)
        pipe.sadd(f"{self.p}L", link.token)
        await self._call(pipe.execute())

    async def get_link(self, token: str) -> Link | None:
        raw = await self._call(self.r.hgetall(self._l(token)))
        if not raw:
            return None
        h = {_s(k): _s(v) for k, v in raw.items()}
        return Link(
            token=token,
            path=h["path"],
            status=LinkStatus(h["status"]),
            expires_at=float(h["expires_at"]),
            created_at=float(h["created_at"]),
            signature=h["signature"],
            used_at=float(h["used_at"]) if "used_at" in h else None,
            used_by_ip=h.get("used_by_ip"),
        )

    async def consume_link(self, token: str, used_at: float, used_by_ip: str) -> bool:
        done = await self._call(self.r.eval(_CONSUME, 1, self._l(token), repr(used_at), used_by_ip))
        return bool(done)

    async def sweep_links(self, now: float, used_before: float) -> int:
        removed = await self._call(self.r.eval(_SWEEP, 0, self.p, repr(now), repr(used_before)))
        return int(removed)

    # ---- erasure layouts -------------------------------------------------------------------
    async def put_erasure(self, layout: ErasureLayout) -> None:
        await self._call(self.r.set(f"{self.p}x:{layout.file_path}", pack_layout(layout)))

    async def get_erasure(self, path: str) -> ErasureLayout | None:
        blob = await self._call(self.r.get(f"{self.p}x:{path}"))
        return unpack_layout(blob.encode() if isinstance(blob, str) else blob) if blob else None

    async def delete_erasure(self, path: str) -> None:
        await self._call(self.r.delete(f"{self.p}x:{path}"))

    # ---- HA replication queue: ``P q:<id>`` hashes ordered by the sorted set ``P Q`` ----------
    async def enqueue_replication(self, path: str, op: str, queued_at: float) -> None:
        item_id = await self._call(self.r.incr(f"{self.p}qid"))
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(f"{self.p}q:{item_id}", items=["path", path, "op", op, "at", repr(queued_at)])
        pipe.zadd(f"{self.p}Q", {str(item_id): item_id})
        await self._call(pipe.execute())

    async def replication_batch(self, limit: int) -> list[tuple[int, str, str]]:
        ids = await self._call(self.r.zrange(f"{self.p}Q", 0, limit - 1))
        if not ids:
            return []
        pipe = self.r.pipeline(transaction=False)
        for item_id in ids:
            pipe.hmget(f"{self.p}q:{_s(item_id)}", ["path", "op"])
        rows = await self._call(pipe.execute())
        return [
            (int(_s(i)), _s(r[0]), _s(r[1]))
            for i, r in zip(ids, rows, strict=True)
            if r[0] is not None
        ]

    async def ack_replication(self, ids: Sequence[int]) -> None:
        if not ids:
            return
        pipe = self.r.pipeline(transaction=True)
        pipe.zrem(f"{self.p}Q", *[str(i) for i in ids])
        pipe.delete(*[f"{self.p}q:{i}" for i in ids])
        await self._call(pipe.execute())

    async def replication_backlog(self) -> int:
        return int(await self._call(self.r.zcard(f"{self.p}Q")))


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
