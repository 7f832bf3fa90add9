"""Redis metadata store (redis-py asyncio): one namespace shared by a cluster.

Data model (``P`` = ``redis_key_prefix``):
- ``P e:<path>``: a hash per entry (``t`` type, ``s`` size, ``o`` owner, ``m`` mtime, ``b`` backend,
  ``i`` owner node, absent for none, ``v`` version, ``c`` created, ``x`` erasure flag, ``k`` blob
  key: absent for directories, and for files written before blob keys, whose key is their path);
- ``P c:<dir>``: a sorted set of the directory's children, all with score 0, members ``0<name>`` for
  files and ``1<name>`` for directories: Redis orders equal scores by member bytes, which is exactly
  the contract order (files first, then code-point order), so a listing is one ZRANGE, O(children),
  and a page one ZRANGEBYLEX from the member past the cursor, O(log children + page);
- ``P l:<token>`` link hashes and the set ``P L`` of all tokens (for the sweep);
- ``P x:<path>`` erasure layouts as msgpack;
- ``P B``: the set of every blob key an entry names (the orphan sweep asks it).

Every namespace change is one conditional command: WATCH every key its decision reads (entries,
ancestors, the children sets of a subtree as it is walked), decide with the shared
``common.plan_*``, then apply the plan in one MULTI/EXEC, which Redis refuses if any watched key
changed meanwhile (the command is then decided again). Every key a command touches is thus declared
to Redis. Link create, consume and sweep are Lua scripts. A recursive listing costs two round
trips per tree level (children sets, then their hashes), never one per entry.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import msgpack
import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError, ResponseError, WatchError

from callfs.errors import (
    AlreadyExists,
    Unavailable,
)
from callfs.metadata.base import ChildPosition
from callfs.metadata.common import (
    ROOT,
    Plan,
    create_reads,
    move_reads,
    order_tree,
    pack_layout,
    plan_create,
    plan_delete,
    plan_delete_tree,
    plan_move,
    plan_update,
    unpack_layout,
)
from callfs.model import (
    BackendType,
    Entry,
    EntryType,
    ErasureLayout,
    Link,
    LinkStatus,
    NewParents,
    Placement,
    name_of,
)
from callfs.redisconn import open_redis

T = TypeVar("T")
log = logging.getLogger(__name__)

_WATCH_RETRIES = 50
#: How long an EXEC's marker key lives (it is read right after the EXEC's reply is lost).
_MARKER_TTL = 600
#: The marker's value once a retry fenced off the attempts before it.
_FENCED = b"fenced"
#: Entries a listing script reads at most (it holds Redis meanwhile: ~2 ms per 1000).
_BATCH = 5000

# Read several entry hashes in one round trip (inside a WATCH, where pipelining is not possible).
_MGETALL = """
local out = {}
for i, key in ipairs(KEYS) do out[i] = redis.call('HGETALL', key) end
return out
"""
# The members of several children sets in one round trip.
_MZRANGE = """
local out = {}
for i, key in ipairs(KEYS) do out[i] = redis.call('ZRANGE', key, 0, -1) end
return out
"""
# The fields of an entry hash a listing reads, in the order of ``_row`` (HMGET: nil, a Lua false,
# for an absent field).
_ROW_FIELDS = "'t', 's', 'o', 'm', 'b', 'i', 'v', 'c', 'x', 'k'"
# Several entry hashes (KEYS) as one msgpack array, flat: ``_ROW_FIELDS`` of each key in turn (all
# false: no such entry). One string to parse instead of a RESP reply per hash: for 10,000 entries
# ~3 ms instead of ~500 ms in redis-py.
_MROWS = f"""
local out, n = {{}}, 0
for _, key in ipairs(KEYS) do
  local r = redis.call('HMGET', key, {_ROW_FIELDS})
  for j = 1, 10 do out[n + j] = r[j] end
  n = n + 10
end
return cmsgpack.pack(out)
"""
# A page of a directory: the members past ARGV[1] (ZRANGEBYLEX), at most ARGV[2], each with its
# entry's ``_ROW_FIELDS`` (ARGV[3]: the entry key prefix of the directory's children), as one
# msgpack array, flat: member, then the 10 fields, per member.
_PAGE = f"""
local members = redis.call('ZRANGEBYLEX', KEYS[1], ARGV[1], '+', 'LIMIT', 0, tonumber(ARGV[2]))
local out, n = {{}}, 0
for _, m in ipairs(members) do
  local r = redis.call('HMGET', ARGV[3] .. string.sub(m, 2), {_ROW_FIELDS})
  out[n + 1] = m
  for j = 1, 10 do out[n + 1 + j] = r[j] end
  n = n + 11
end
return cmsgpack.pack(out)
"""
# Create the root if missing. KEYS: root entry. ARGV: field/value pairs.
_CREATE_ROOT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""
# KEYS: link hash, token set. ARGV: token, field/value pairs. 0 if the token exists.
_CREATE_LINK = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('SADD', KEYS[2], ARGV[1])
return 1
"""
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


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


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
        "v",
        e.version,
        "c",
        e.created_at,
        "x",
        int(e.erasure_coded),
    ]
    if e.instance_id is not None:
        out += ["i", e.instance_id]
    out += ["k", e.blob_key or ""]  # "" none; absent: written before blob keys
    return out


def _decode(path: str, raw: dict[Any, Any] | list[Any]) -> Entry:
    if isinstance(raw, list):
        raw = dict(zip(raw[::2], raw[1::2], strict=True))
    h = {_s(k): _s(v) for k, v in raw.items()}
    kind = EntryType(h["t"])
    blob = h.get("k")
    if blob is None and kind is EntryType.FILE:
        blob = path  # written before blob keys: the bytes are at the namespace path
    blob = blob or None
    return Entry(
        path=path,
        type=kind,
        size=int(h["s"]),
        owner=h["o"],
        mtime=int(h["m"]),
        backend_type=BackendType(h["b"]),
        instance_id=h.get("i"),
        version=int(h["v"]),
        created_at=int(h["c"]),
        erasure_coded=h["x"] == "1",
        blob_key=blob,
    )


_TYPES = {t.value: t for t in EntryType}
_BACKENDS = {b.value: b for b in BackendType}


def _row(path: str, fields: Sequence[Any]) -> Entry | None:
    """``_decode`` of an entry's ``_ROW_FIELDS`` as the scripts return them (str; False: absent),
    None if there is no such entry. Called once per listed entry: lookups, no dict."""
    t, s, o, m, b, i, v, c, x, k = fields
    if t is False:
        return None
    kind = _TYPES.get(t) or EntryType(t)
    if k is False:  # written before blob keys: a file's bytes are at the namespace path
        k = path if kind is EntryType.FILE else None
    return Entry(
        path,
        kind,
        int(s),
        o,
        int(m),
        _BACKENDS.get(b) or BackendType(b),
        None if i is False else i,
        int(v),
        int(c),
        x == "1",
        k or None,
    )


def _unpack(raw: bytes) -> list[Any]:
    """A script's msgpack array (Lua's cmsgpack packs an empty table as a map)."""
    out = msgpack.unpackb(raw)
    return out if isinstance(out, list) else []


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
        """Connect and ensure the root; failure names the address and the cause."""
        from callfs.locks.redis import redis_cause

        self._redis, self._pool = open_redis(self._addr, self._password, self._db, self._timeout)
        try:
            await self._call(self.r.eval(_CREATE_ROOT, 1, self._e("/"), *_fields(ROOT)))
        except Unavailable as exc:
            await self.close()
            cause = exc.__cause__ or exc
            raise Unavailable(
                f"cannot open the Redis metadata store at {self._addr} db {self._db}: "
                f"{redis_cause(cause, 'metadata_store')}"
            ) from cause
        await self._check_durability()

    async def _check_durability(self) -> None:
        """Warn when Redis does not fsync each write before answering: a 2xx then does not mean
        durable, and after a power failure the file's record can come back naming bytes that
        were reclaimed after the commit (the previous version lost with the new one)."""
        try:
            # one pattern: CONFIG GET takes several only from Redis 7 on
            settings = await self._call(self.r.config_get("append*"))
        except Unavailable:
            log.info("cannot read Redis's persistence settings (CONFIG GET refused)")
            return
        found = {_text(k): _text(v) for k, v in settings.items()}
        appendonly = found.get("appendonly", "?")
        appendfsync = found.get("appendfsync", "?")
        if (appendonly, appendfsync) != ("yes", "always"):
            log.warning(
                "the Redis metadata store at %s does not fsync every write (appendonly %s, "
                "appendfsync %s): acknowledged writes can be lost on a crash or power failure. "
                "Set appendonly yes and appendfsync always (docs/metadata-stores.md).",
                self._addr,
                appendonly,
                appendfsync,
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

    def _b(self) -> str:
        """The set of every blob key an entry names (``blobs_referenced``)."""
        return f"{self.p}B"

    async def call(self, call: Awaitable[T]) -> T:
        """Bound and translate one Redis call like every store call (for the WorkQueue)."""
        return await self._call(call)

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
        if not raw and path == "/":
            # A Redis restarted without its data (no persistence): the root comes back as at
            # start, instead of "/" answering 404 until callfs was restarted (found by audit)
            await self._call(self.r.eval(_CREATE_ROOT, 1, self._e("/"), *_fields(ROOT)))
            raw = await self._call(self.r.hgetall(self._e(path)))
        return _decode(path, raw) if raw else None

    async def _command(self, decide: Callable[[Pipeline], Awaitable[tuple[Plan, T]]]) -> T:
        """One conditional command: WATCH every key the decision reads, read, decide (a
        ``common.plan_*``), then MULTI/EXEC the plan; EXEC fails if any watched key changed, and
        the command is decided again on fresh reads.

        The EXEC also sets a marker key of its own, to the number of the attempt, and every
        attempt WATCHes that marker. redis-py turns a connection lost (or a reply late) while
        keys are watched into a ``WatchError``, also when the lost part is the reply to an EXEC
        that Redis applied, or will apply: deciding again then saw our own write (an update
        "replaced" the entry it had just written and the engine reclaimed the new bytes; a
        create became 409). So once an EXEC went out, the next attempt first fences
        (``_fence``): it reads the marker, and if no attempt applied, sets it to a fence value
        in a transaction of its own. An EXEC still on its way then fails (its watched marker
        changed), and the command is decided again on fresh reads; if one applied, its result
        is the answer."""
        marker = f"{self.p}applied:{secrets.token_hex(12)}"

        async def attempt() -> T:
            sent: dict[int, T] = {}  # attempts whose EXEC went out, and what each decided
            for n in range(_WATCH_RETRIES):
                try:
                    if sent:
                        applied = await self._fence(marker)
                        if applied is not None:
                            return sent[applied]  # it applied; only its reply was lost
                        sent.clear()  # none did, and none can any more
                    async with self.r.pipeline(transaction=True) as pipe:
                        await pipe.watch(marker)
                        plan, result = await decide(pipe)
                        self._queue_plan(pipe, plan)
                        pipe.set(marker, str(n).encode(), ex=_MARKER_TTL)
                        sent[n] = result
                        await pipe.execute()
                        return result
                except WatchError:
                    await asyncio.sleep(0.001 * (n + 1))
            raise Unavailable("metadata store is too contended")

        return await self._call(attempt())

    async def _fence(self, marker: str) -> int | None:
        """The attempt that applied (``_command``), or None once no earlier one can: the marker
        is set to a fence value, which fails any EXEC still on its way (each watched it)."""
        for n in range(_WATCH_RETRIES):
            try:
                async with self.r.pipeline(transaction=True) as pipe:
                    await pipe.watch(marker)
                    found = await pipe.get(marker)
                    if found is not None and found != _FENCED:
                        return int(found)
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.set(marker, _FENCED, ex=_MARKER_TTL)
                    await pipe.execute()
                    return None
            except WatchError:  # the marker changed meanwhile (or the reply was lost): look again
                await asyncio.sleep(0.001 * (n + 1))
        raise Unavailable("metadata store unavailable")

    async def _read_entries(self, pipe: Pipeline, paths: list[str]) -> dict[str, Entry | None]:
        keys = [self._e(p) for p in paths]
        await pipe.watch(*keys)
        raws = await pipe.eval(_MGETALL, len(keys), *keys)
        return {p: (_decode(p, raw) if raw else None) for p, raw in zip(paths, raws, strict=True)}

    async def _has_children_watched(self, pipe: Pipeline, path: str) -> bool:
        await pipe.watch(self._c(path))
        return bool(await pipe.zcard(self._c(path)))

    async def _subtree_watched(self, pipe: Pipeline, top: str) -> list[Entry]:
        """Every descendant of ``top``, watching each entry and children set on the way."""
        found: list[Entry] = []
        level = [top]
        while level:
            sets = [self._c(d) for d in level]
            await pipe.watch(*sets)
            member_lists = await pipe.eval(_MZRANGE, len(sets), *sets)
            children = [
                self._child(d, m) for d, ms in zip(level, member_lists, strict=True) for m in ms
            ]
            if not children:
                break
            entries = await self._read_entries(pipe, children)
            below = [e for e in entries.values() if e is not None]
            found.extend(below)
            level = [e.path for e in below if e.is_dir]
        return found

    def _queue_plan(self, pipe: Pipeline, plan: Plan) -> None:
        """Queue a plan's writes inside MULTI (``common.Plan``: deletes, then puts)."""
        pipe.multi()  # type: ignore[no-untyped-call]
        for e in plan.deletes:
            pipe.delete(self._e(e.path))
            pipe.zrem(self._c(e.parent), _member(e.type, e.path))
            if e.blob_key is not None:
                pipe.srem(self._b(), e.blob_key)
        for e in plan.puts:
            pipe.delete(self._e(e.path))
            pipe.hset(self._e(e.path), items=_fields(e))
            if e.path != "/":
                pipe.zadd(self._c(e.parent), {_member(e.type, e.path): 0})
            if e.blob_key is not None:
                pipe.sadd(self._b(), e.blob_key)

    async def create(self, entry: Entry, parents: NewParents | None = None) -> Entry:
        async def op(pipe: Pipeline) -> tuple[Plan, Entry]:
            known = await self._read_entries(pipe, create_reads(entry.path))
            plan, stored = plan_create(entry, parents, known)
            return plan, stored

        return await self._command(op)

    async def update(self, entry: Entry, expected_version: int) -> Entry:
        async def op(pipe: Pipeline) -> tuple[Plan, Entry]:
            current = (await self._read_entries(pipe, [entry.path]))[entry.path]
            plan, stored = plan_update(entry, expected_version, current)
            return plan, stored

        return await self._command(op)

    async def delete(self, path: str, expected_version: int | None = None) -> Entry:
        async def op(pipe: Pipeline) -> tuple[Plan, Entry]:
            current = (await self._read_entries(pipe, [path]))[path]
            busy = (
                current is not None
                and current.is_dir
                and await self._has_children_watched(pipe, path)
            )
            plan, removed = plan_delete(path, expected_version, current, busy)
            return plan, removed

        return await self._command(op)

    async def delete_tree(
        self, path: str, expected_version: int | None = None, actor: str | None = None
    ) -> list[Entry]:
        async def op(pipe: Pipeline) -> tuple[Plan, list[Entry]]:
            top = (await self._read_entries(pipe, [path]))[path]
            below = await self._subtree_watched(pipe, path) if top is not None else []
            plan, removed = plan_delete_tree(path, expected_version, top, below, actor)
            return plan, removed

        return await self._command(op)

    async def move(
        self,
        src: str,
        dst: str,
        *,
        expected_version: int,
        dst_expected: int | None = None,
        parents: NewParents | None = None,
        placement: Placement | None = None,
    ) -> tuple[Entry, Entry | None]:
        async def op(pipe: Pipeline) -> tuple[Plan, tuple[Entry, Entry | None]]:
            known = await self._read_entries(pipe, move_reads(src, dst))
            below = await self._subtree_watched(pipe, src) if dst != src else []
            busy = await self._has_children_watched(pipe, dst)
            plan, result = plan_move(
                src, dst, expected_version, dst_expected, parents, placement, known, below, busy
            )
            return plan, result

        return await self._command(op)

    async def _entries(self, paths: list[str]) -> list[Entry]:
        """The entries at ``paths`` (absent ones skipped), in order: one round trip, a script
        per ``_BATCH`` hashes (each answers one msgpack string, not a RESP reply per hash)."""
        if not paths:
            return []
        pipe = self.r.pipeline(transaction=False)
        for i in range(0, len(paths), _BATCH):
            keys = [self._e(p) for p in paths[i : i + _BATCH]]
            pipe.eval(_MROWS, len(keys), *keys)
        rows = [f for raw in await self._call(pipe.execute()) for f in _unpack(raw)]
        found = (_row(p, rows[10 * n : 10 * n + 10]) for n, p in enumerate(paths))
        return [e for e in found if e is not None]

    @staticmethod
    def _child(directory: str, member: Any) -> str:
        return ("" if directory == "/" else directory) + "/" + _s(member)[1:]

    async def list_children(self, path: str) -> list[Entry]:
        """``list_children_page`` from the start, ``_BATCH`` entries a script: a script holds
        Redis for its whole run, so a huge directory is read in slices (not a snapshot, as
        before: the members, then their hashes, were never read at once)."""
        out: list[Entry] = []
        after: str | None = None
        while True:
            page, after = await self._page(path, after, _BATCH)
            out.extend(page)
            if after is None:
                return out

    async def list_children_page(
        self, path: str, after: ChildPosition | None, limit: int
    ) -> list[Entry]:
        """One script: ZRANGEBYLEX from the member past ``after`` (the members' ``0``/``1`` type
        prefix makes member order the listing order) and the page's hashes, as one msgpack
        string (parsing 1000 entries' fields as RESP costs ~45 ms in redis-py, as one string
        ~0.5 ms). A member without an entry hash is skipped and the page topped up from past it."""
        low = None
        if after is not None:
            low = ("1" if after[0] is EntryType.DIRECTORY else "0") + after[1]
        out: list[Entry] = []
        while len(out) < limit:
            page, low = await self._page(path, low, limit - len(out))
            out.extend(page)
            if low is None:
                break
        return out

    async def _page(
        self, path: str, after: str | None, limit: int
    ) -> tuple[list[Entry], str | None]:
        """Up to ``limit`` children past the member ``after`` (None: from the first) that have
        an entry hash, and the last member read (where to go on from), or None once the
        script read fewer than ``limit`` members: the set has no more."""
        low = "-" if after is None else "(" + after
        base = self._e("" if path == "/" else path) + "/"
        raw = await self._call(self.r.eval(_PAGE, 1, self._c(path), low, limit, base))
        flat = _unpack(raw)
        parent = "" if path == "/" else path
        out: list[Entry] = []
        for n in range(0, len(flat), 11):
            entry = _row(parent + "/" + flat[n][1:], flat[n + 1 : n + 11])
            if entry is not None:
                out.append(entry)
        last = flat[-11] if len(flat) == 11 * limit else None
        return out, last

    async def count_children(self, path: str) -> int:
        return int(await self._call(self.r.zcard(self._c(path))))

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

    async def blobs_referenced(self, keys: Sequence[str]) -> set[str]:
        wanted = list(keys)
        if not wanted:
            return set()
        flags = await self._call(self.r.smismember(self._b(), wanted))
        return {k for k, flag in zip(wanted, flags, strict=True) if flag}

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
        created = await self._call(
            self.r.eval(_CREATE_LINK, 2, self._l(link.token), f"{self.p}L", link.token, *items)
        )
        if not created:
            raise AlreadyExists("link exists")

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


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
