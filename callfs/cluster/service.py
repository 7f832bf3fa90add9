"""A node's view of the Raft group, for the metadata store and the internal endpoints.

- ``execute`` commits one command: proposed here on the leader, forwarded over HTTP
  (``POST /v1/internal/raft/metadata/apply``) from a follower. A "maybe applied" outcome (timeout,
  leader change) is retried with the same request id until ``raft.apply_timeout``: the state
  machine answers a retry from memory, so nothing applies twice.
- ``read`` gives read-your-writes on every node (API.md §12.4): a follower asks the leader for its
  commit index (one request shared by every read waiting at that moment) and waits until it has
  applied that far; a node that cannot learn it (no leader, partitioned) answers 503, never stale
  data. The leader reads locally while it holds a quorum.
- Membership: nodes' API endpoints live in the replicated state (``member_put``); joins and
  removals are serialised on the leader.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import heapq
import hmac
import itertools
import logging
import sqlite3
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import aiohttp

from callfs.cluster.channel import FALLBACK_SECONDS, ChannelLost, LeaderChannel, NoChannel
from callfs.cluster.fsm import BATCH
from callfs.cluster.raft import NotApplied, OutcomeUnknown, RaftNode
from callfs.concurrency import retrieved
from callfs.errors import BadRequest, CallFSError, Unavailable
from callfs.metadata import raft_commands as C
from callfs.metadata.sqlite_readers import SqliteReaders

log = logging.getLogger(__name__)
T = TypeVar("T")

APPLY_PATH = "/v1/internal/raft/metadata/apply"
MSGPACK = "application/x-msgpack"
_RETRY_PAUSE = 0.05
#: How often a follower waiting on the leader (a read index, a forwarded command) checks whether
#: another node has become leader meanwhile.
_LEADER_WATCH = 0.05
#: Group commit: log entries in flight at once, commands and bytes per entry (pysyncobj's
#: chunked path for entries over 64 KB is unreliable: LIBRARIES.md §1.13 trap 7).
_MAX_FLIGHTS = 4
_MAX_FORWARDS = 2
_MAX_BATCH = 128
_MAX_BATCH_BYTES = 48 * 1024
_PEER_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError)
#: How often reads waiting for the local replica to apply an index check it.
_APPLIED_POLL = 0.001
#: How often a read waiting for the leader's lease looks again (seconds).
_LEASE_POLL = 0.005


def raft_password(internal_secret: str) -> str:
    """The Raft port's password, derived from ``auth.internal_proxy_secret`` (never stored)."""
    return hmac.new(
        internal_secret.encode(), b"callfs-raft-transport-v1", hashlib.sha256
    ).hexdigest()


class LeadershipMoved(Exception):
    """This node handed the leadership to ``leader_id`` (to be removed by it): ask that one."""

    def __init__(self, leader_id: str | None) -> None:
        super().__init__(f"the leadership moved to {leader_id}")
        self.leader_id = leader_id


class RaftService:
    def __init__(
        self,
        node: RaftNode,
        *,
        api_endpoint: str,
        peer_addrs: Mapping[str, str],
        peer_endpoints: Mapping[str, str],
        apply_timeout: float,
        forward_timeout: float,
        internal_secret: str,
        session: Callable[[], aiohttp.ClientSession],
    ) -> None:
        self.node = node
        self.node_id = node.settings.node_id
        self.api_endpoint = api_endpoint.rstrip("/")
        #: Raft node ID -> Raft address / API endpoint from the config (the replicated member
        #: table adds and overrides).
        self._config_addrs = dict(peer_addrs)
        self._config_endpoints = {k: v.rstrip("/") for k, v in peer_endpoints.items()}
        self.apply_timeout = apply_timeout
        self.forward_timeout = forward_timeout
        self._secret = internal_secret
        self._session = session
        self._readers = SqliteReaders(
            lambda: sqlite3.connect(node.fsm.path, check_same_thread=False), "callfs-raft-r"
        )
        self._next_index: asyncio.Future[int] | None = None
        self._fetching = False
        self._fetcher: asyncio.Future[None] | None = None
        self._pending: collections.deque[tuple[bytes, asyncio.Future[bytes]]] = collections.deque()
        self._flights = 0
        self._members_cache: tuple[int, dict[str, tuple[str, str]], dict[str, int]] | None = None
        self._tasks: set[asyncio.Future[None]] = set()
        #: The WebSocket to the leader that forwards and read-index questions go through, and
        #: leader endpoints without one (an earlier build) -> when to try it again.
        self._channel: LeaderChannel | None = None
        self._no_channel: dict[str, float] = {}
        #: Reads waiting for the local replica to apply an index: (index, seq, future), and the
        #: task that releases them.
        self._apply_waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._apply_ids = itertools.count()
        self._apply_live = 0
        self._apply_watch: asyncio.Future[None] | None = None
        #: Questions this node sent the leader, by the way they went (``status``).
        self.forwards = {"channel": 0, "post": 0}
        self.commit_seconds: list[float] = []
        self.on_commit: Callable[[float], None] | None = None

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Start the Raft node (on the main thread: see ``RaftNode.start``) and the readers."""
        self.node.start()
        self._readers.start()

    async def close(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close()
        await self._readers.close()
        await asyncio.to_thread(self.node.stop)

    async def register(self) -> None:
        """Record this node's API endpoint in the replicated state (retried until a leader takes
        it; a start without quorum simply keeps trying)."""
        while True:
            try:
                await self.execute(
                    "member_put", [self.node_id, self.node.settings.bind_addr, self.api_endpoint]
                )
                break
            except Unavailable:
                await asyncio.sleep(1.0)
        try:
            await self.execute("member_level", [self.node_id, C.LEVEL])
        except CallFSError as exc:  # a leader of a version before levels: told next time
            log.info("raft command level not announced yet: %s", exc.message)

    # ---- writes ------------------------------------------------------------------------------
    async def execute(self, name: str, args: list[Any]) -> Any:
        """Commit one command and return its result (or raise its error). A command some member
        could not apply yet (``supports``) is refused before it reaches the log."""
        if not self.supports(name):
            raise Unavailable(
                f"metadata command {name!r} waits for every raft node to run command level"
                f" {C.level_of(name)} (cluster level {self.cluster_level()}): finish the upgrade"
            )
        return C.result(await self.submit(C.command(uuid.uuid4().hex, time.time(), name, args)))

    def cluster_level(self) -> int:
        """The highest command level every voter has announced; a voter with no member row or
        no announcement yet (just joined, or of a version before levels) counts as 1."""
        rows, levels = self._member_table()
        by_addr = {addr: levels.get(node_id, 1) for node_id, (addr, _e) in rows.items()}
        try:
            voters = set(self.node.members())
        except NotApplied:
            voters = set(by_addr)
        voters.add(self.node.settings.bind_addr)
        return min(by_addr.get(addr, 1) for addr in voters)

    def supports(self, name: str) -> bool:
        """Whether every member applies command ``name`` (always true for level-1 commands)."""
        level = C.level_of(name)
        return level <= 1 or level <= self.cluster_level()

    async def submit(self, payload: bytes) -> bytes:
        """Commit one encoded command; its encoded result. Concurrent commands share log
        entries (group commit): a lone command goes at once, the ones arriving while
        ``_MAX_FLIGHTS`` entries are in flight leave together in the next, each with its own
        request id (a retried batch applies none of its commands twice)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes] = loop.create_future()
        self._pending.append((payload, future))
        if self._flights < self._max_flights():
            self._launch()
        return await future

    def _max_flights(self) -> int:
        """Entries in flight at once: a follower forwards fewer, bigger batches (with four in
        flight each carried about one command; over HTTP that cost the leader a request each,
        and over the channel four measured no faster than two: ``bench/README.md``)."""
        return _MAX_FLIGHTS if self.node.is_leader() else _MAX_FORWARDS

    def _launch(self) -> None:
        take: list[tuple[bytes, asyncio.Future[bytes]]] = []
        size = 0
        while self._pending and len(take) < _MAX_BATCH:
            cost = len(self._pending[0][0]) + 8
            if take and size + cost > _MAX_BATCH_BYTES:
                break
            take.append(self._pending.popleft())
            size += cost
        if not take:
            return
        self._flights += 1
        task = asyncio.ensure_future(self._flight(take))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _flight(self, take: list[tuple[bytes, asyncio.Future[bytes]]]) -> None:
        try:
            if len(take) == 1:
                payload = take[0][0]
            else:
                payload = C.command("", time.time(), BATCH, [p for p, _f in take])
            try:
                data = await self._commit(payload)
                results = [data] if len(take) == 1 else list(C.result(data))
            except Exception as exc:
                for _p, future in take:
                    if not future.done():
                        future.set_exception(exc)
                return
            for (_p, future), one in zip(take, results, strict=True):
                if not future.done():
                    future.set_result(bytes(one))
        finally:
            self._flights -= 1
            if self._pending and self._flights < self._max_flights():
                self._launch()

    async def _commit(self, payload: bytes) -> bytes:
        """Append one entry; its encoded result. Retries "maybe applied" with the same request
        id until ``raft.apply_timeout``, then ``Unavailable``."""
        started = time.perf_counter()
        deadline = time.monotonic() + self.apply_timeout
        why = "no raft leader"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Unavailable(f"metadata commit failed: {why}")
            try:
                if self.node.is_leader():
                    data = await self.node.propose(payload, remaining)
                else:
                    data = await self._ask_leader({"op": "apply", "cmd": payload}, remaining)
                break
            except (NotApplied, OutcomeUnknown, Unavailable) as exc:
                why = exc.message if isinstance(exc, CallFSError) else str(exc)
                await asyncio.sleep(min(_RETRY_PAUSE, max(0.0, deadline - time.monotonic())))
        if self.on_commit is not None:
            self.on_commit(time.perf_counter() - started)
        return bytes(data)

    async def serve_apply(self, body: bytes) -> tuple[int, bytes]:
        """The leader's side of ``/v1/internal/raft/metadata/apply``: ``(status, msgpack)``."""
        try:
            request = C.unpack(body)
            op = request["op"]
        except Exception:
            return 400, C.pack({"error": "invalid request"})
        if not self.node.is_leader():
            return 502, C.pack({"error": "not leader", "leader_id": self.leader_id()})
        if op == "read_index":
            if not self.node.leader_ready() or not await self._leased():
                return 503, C.pack({"error": "leader not ready"})
            return 200, C.pack({"index": self.node.commit_index})
        if op != "apply" or not isinstance(request.get("cmd"), bytes):
            return 400, C.pack({"error": "invalid request"})
        try:
            # into this leader's group commit, with the commands of its own clients
            data = await asyncio.wait_for(self.submit(request["cmd"]), self.forward_timeout)
        except (TimeoutError, Unavailable) as exc:
            return 503, C.pack({"error": str(exc) or "commit timed out", "applied": None})
        return 200, C.pack({"result": data})

    async def _ask_leader(self, request: dict[str, Any], wait: float) -> Any:
        """``_forward``, abandoned with ``Unavailable`` as soon as another node is known to lead
        (the one asked is frozen, partitioned or deposed), so callers retry on the new leader
        at once instead of waiting out ``raft.forward_timeout``. A command abandoned this way
        may still apply: retries carry the same request id, which the state machine answers
        from memory."""
        leader = self.node.leader_addr()
        ask = asyncio.ensure_future(self._forward(request, wait))
        try:
            while True:
                done, _ = await asyncio.wait((ask,), timeout=_LEADER_WATCH)
                if done:
                    return ask.result()
                now = self.node.leader_addr()
                if now is not None and now != leader:
                    raise Unavailable("the raft leader changed")
        finally:
            if not ask.done():
                ask.cancel()
                ask.add_done_callback(retrieved)

    async def _forward(self, request: dict[str, Any], wait: float) -> Any:
        """Send ``request`` to the leader (over the channel, else POST); the decoded answer's
        payload. ``Unavailable`` when there is no reachable leader or it refused (the caller
        retries)."""
        endpoint = self.leader_endpoint()
        if endpoint is None:
            raise Unavailable("no raft leader")
        body = C.pack(request)
        timeout = min(wait, self.forward_timeout)
        try:
            if self._no_channel.get(endpoint, 0.0) <= time.monotonic():
                try:
                    status, raw = await self._channel_to(endpoint).ask(body, timeout)
                    self.forwards["channel"] += 1
                except NoChannel:
                    self._no_channel[endpoint] = time.monotonic() + FALLBACK_SECONDS
                    status, raw = await self._post(endpoint, body, timeout)
            else:
                status, raw = await self._post(endpoint, body, timeout)
        except (*_PEER_ERRORS, ChannelLost) as exc:
            raise Unavailable(f"raft leader unreachable ({type(exc).__name__})") from exc
        try:
            answer = C.unpack(raw)
        except Exception as exc:
            raise Unavailable(f"raft leader answered {status}") from exc
        if status != 200 or not isinstance(answer, dict):
            error = answer.get("error") if isinstance(answer, dict) else None
            raise Unavailable(f"raft leader answered {status}: {error}")
        if "result" in answer:
            return answer["result"]
        return answer["index"]

    async def _post(self, endpoint: str, body: bytes, seconds: float) -> tuple[int, bytes]:
        self.forwards["post"] += 1
        async with self._session().post(
            endpoint + APPLY_PATH,
            data=body,
            headers={"Authorization": f"Bearer {self._secret}", "Content-Type": MSGPACK},
            timeout=aiohttp.ClientTimeout(total=seconds),
        ) as resp:
            return resp.status, await resp.read()

    def _channel_to(self, endpoint: str) -> LeaderChannel:
        """The open channel to ``endpoint``; a channel to another node (the old leader) or a
        closed one is replaced (the old one is closed in the background: a frozen node would
        hold up its close handshake)."""
        channel = self._channel
        if channel is not None and channel.endpoint == endpoint and not channel.closed:
            return channel
        if channel is not None:
            task = asyncio.ensure_future(channel.close())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._channel = LeaderChannel(endpoint, self._session, self._secret)
        return self._channel

    # ---- reads -------------------------------------------------------------------------------
    async def barrier(self) -> None:
        """Return once this node has applied every write any node acknowledged before the call."""
        if self.node.fsm.broken:
            raise Unavailable(f"this metadata replica is out of service: {self.node.fsm.broken}")
        deadline = time.monotonic() + self.apply_timeout
        while True:  # an election in progress is waited for, up to raft.apply_timeout
            try:
                target = await self._target()
                break
            except Unavailable:
                if time.monotonic() + _RETRY_PAUSE > deadline:
                    raise
                await asyncio.sleep(_RETRY_PAUSE)
        await self._until_applied(target, deadline)

    async def _until_applied(self, target: int, deadline: float) -> None:
        """Return once the local replica has applied ``target`` (``Unavailable`` at
        ``deadline``, a ``time.monotonic`` value)."""
        if self.node.last_applied >= target:
            return
        waiter = asyncio.get_running_loop().create_future()
        heapq.heappush(self._apply_waiters, (target, next(self._apply_ids), waiter))
        self._apply_live += 1
        if self._apply_watch is None or self._apply_watch.done():
            self._apply_watch = asyncio.ensure_future(self._watch_applied())
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await waiter
        except TimeoutError:
            raise Unavailable("this node is not catching up with the raft leader") from None
        finally:
            waiter.cancel()  # left in the heap, skipped by the watch
            self._apply_live -= 1

    async def _watch_applied(self) -> None:
        """Every ``_APPLIED_POLL`` while reads wait: release those whose index the local replica
        has applied (one timer for all of them; the index is set by the tick thread)."""
        waiters = self._apply_waiters
        while self._apply_live:
            await asyncio.sleep(_APPLIED_POLL)
            try:
                applied = self.node.last_applied
            except Exception as exc:  # the node stopped (``NotApplied``): every read learns it
                for _index, _seq, waiter in waiters:
                    if not waiter.done():
                        waiter.set_exception(exc)
                waiters.clear()
                return
            while waiters and (waiters[0][0] <= applied or waiters[0][2].done()):
                ready = heapq.heappop(waiters)[2]
                if not ready.done():
                    ready.set_result(None)
        waiters.clear()  # only abandoned ones are left

    async def _target(self) -> int:
        if self.node.is_leader():
            if not self.node.leader_ready():
                raise Unavailable("raft leader has not committed its first entry yet")
            if not await self._leased():
                raise Unavailable("raft leader cannot confirm that it still leads")
            return self.node.commit_index
        return await self._read_index()

    async def _leased(self) -> bool:
        """The leader's read lease holds (``RaftNode.lease_holds``), waited for up to one
        minimum election timeout (a leader just elected, answers late): False once this node
        no longer leads or the wait is over."""
        node = self.node
        if node.lease_holds():
            return True
        deadline = time.monotonic() + node.settings.election_min
        while time.monotonic() < deadline:
            await asyncio.sleep(_LEASE_POLL)
            if node.lease_holds():
                return True
            if not node.is_leader():
                return False
        return False

    async def _read_index(self) -> int:
        """The leader's commit index, fetched by a request that STARTS after this call began
        (one request serves every reader waiting for it)."""
        loop = asyncio.get_running_loop()
        if self._next_index is None:
            self._next_index = loop.create_future()
            if not self._fetching:
                self._fetching = True
                self._fetcher = asyncio.ensure_future(self._fetch_indexes())
        future = self._next_index
        return await asyncio.shield(future)

    async def _fetch_indexes(self) -> None:
        try:
            while self._next_index is not None:
                future, self._next_index = self._next_index, None
                try:
                    index = await self._ask_leader({"op": "read_index"}, self.apply_timeout)
                except Exception as exc:
                    if not future.done():
                        future.set_exception(
                            exc
                            if isinstance(exc, CallFSError)
                            else Unavailable("raft read barrier failed")
                        )
                    # Nobody may be awaiting it any more (a cancelled read): mark it retrieved.
                    future.exception()
                    continue
                if not future.done():
                    future.set_result(int(index))
        finally:
            self._fetching = False

    async def read(self, fn: Callable[[sqlite3.Connection], T], *, point: bool = False) -> T:
        """Run ``fn`` on a consistent local view after the read barrier. Point reads (one row)
        run inline when they can (see ``metadata/sqlite.py``)."""
        await self.barrier()
        return await self.read_local(fn, point=point)

    async def read_local(self, fn: Callable[[sqlite3.Connection], T], *, point: bool = False) -> T:
        """Local state without the barrier (cluster bookkeeping, never client-visible data)."""
        return await (self._readers.point(fn) if point else self._readers.run(fn))

    # ---- members -----------------------------------------------------------------------------
    def members(self) -> dict[str, tuple[str, str]]:
        """node ID -> (Raft address, API endpoint) of every current voter: the replicated member
        table, completed from the config for voters that have not registered yet (a node taken
        out of the group is gone from both answers, whatever the config still lists)."""
        out = dict(self._member_rows())
        try:
            voters = set(self.node.members())
        except NotApplied:  # not running: what the table and config say
            voters = {a for a, _e in out.values()} | set(self._config_addrs.values())
        registered = {addr for addr, _e in out.values()}
        for node_id, addr in self._config_addrs.items():
            if node_id not in out and addr not in registered:
                out[node_id] = (addr, self._config_endpoints.get(node_id, ""))
        out[self.node_id] = (self.node.settings.bind_addr, self.api_endpoint)
        return {k: v for k, v in out.items() if v[0] in voters}

    def _member_rows(self) -> dict[str, tuple[str, str]]:
        """The replicated member table, read again only when a command changed it."""
        return self._member_table()[0]

    def _member_levels(self) -> dict[str, int]:
        return self._member_table()[1]

    def _member_table(self) -> tuple[dict[str, tuple[str, str]], dict[str, int]]:
        version = self.node.fsm.members_version
        if self._members_cache is not None and self._members_cache[0] == version:
            return self._members_cache[1], self._members_cache[2]
        rows: dict[str, tuple[str, str]] = {}
        levels: dict[str, int] = {}
        inline = self._readers.inline
        if inline is not None:
            try:
                found = inline.execute(
                    "SELECT node_id, raft_addr, api_endpoint, level FROM raft_members"
                ).fetchall()
            except sqlite3.Error:
                return rows, levels  # not cached: asked again next time
            rows = {n: (a, e.rstrip("/")) for n, a, e, _l in found}
            levels = {n: int(lv) for n, _a, _e, lv in found}
            self._members_cache = (version, rows, levels)
        return rows, levels

    def node_of(self, raft_addr: str) -> str | None:
        for node_id, (addr, _endpoint) in self.members().items():
            if addr == raft_addr:
                return node_id
        return None

    def leader_id(self) -> str | None:
        addr = self.node.leader_addr()
        return None if addr is None else self.node_of(addr)

    def leader_endpoint(self) -> str | None:
        addr = self.node.leader_addr()
        if addr is None:
            return None
        for _node_id, (member_addr, endpoint) in self.members().items():
            if member_addr == addr and endpoint:
                return endpoint
        return None

    def endpoints(self) -> dict[str, str]:
        """node ID -> API endpoint of every known member (for byte proxying)."""
        return {k: e for k, (_a, e) in self.members().items() if e}

    async def join(self, node_id: str, raft_addr: str, api_endpoint: str) -> None:
        """Leader only: make ``node_id`` at ``raft_addr`` a voter (API.md §12.6)."""
        if not node_id or not raft_addr:
            raise BadRequest("node_id and raft_addr are required")
        timeout = self.apply_timeout
        voters = set(self.node.members())
        known = self.members()
        if raft_addr in voters and known.get(node_id, ("", ""))[0] == raft_addr:
            # already a voter at that address: success, no change (API.md §12.6); its endpoint
            # and command level are the ones it registers itself
            return
        own_addr = self.node.settings.bind_addr
        if (node_id == self.node_id) != (raft_addr == own_addr):
            # "stale entries" of the leader itself: it cannot remove itself, and rewriting only
            # its member row left every follower unable to find the leader (found by review)
            raise BadRequest(
                f"{node_id!r} at {raft_addr} would replace the leader ({self.node_id!r} at"
                f" {own_addr}): a joining node needs a node ID and a Raft address of its own"
            )
        stale = {
            other_id: addr
            for other_id, (addr, _e) in known.items()
            if (other_id == node_id) != (addr == raft_addr)
        }
        if raft_addr not in voters:
            await self._check_quorum_after_join(raft_addr, voters - set(stale.values()))
        for other_id, addr in stale.items():
            if addr in voters:
                await self.node.remove_voter(addr, timeout)
                voters.discard(addr)
            await self.execute("member_remove", [other_id])
        if raft_addr not in voters:
            await self.node.add_voter(raft_addr, timeout)
        self.node.force_snapshot()
        await self.execute("member_put", [node_id, raft_addr, api_endpoint.rstrip("/")])

    async def _check_quorum_after_join(self, raft_addr: str, voters: set[str]) -> None:
        """Refuse a join that would leave the group without a majority until the new node runs.
        pysyncobj applies a membership change as soon as it is appended: with one of three
        voters down, a fourth that is not started yet stopped every write and read, and the
        timed-out join could not even be undone (no leader to ask)."""
        after = voters | {raft_addr}
        answering = self.node.answering() & voters
        if await _listening(raft_addr):
            answering.add(raft_addr)
        need = len(after) // 2 + 1
        if len(answering) < need:
            silent = sorted(voters - answering)
            raise Unavailable(
                f"adding {raft_addr} now would leave the group without a majority"
                f" ({need} of {len(after)} voters needed, {len(answering)} answering;"
                f" not answering: {', '.join(silent) or 'none'}; the new node is "
                f"{'up' if raft_addr in answering else 'not started'}): bring the silent"
                " voters back or remove them, or start the new node first"
            )

    async def remove(self, node_id: str) -> None:
        """Leader only: take ``node_id`` out of the group. The leader cannot remove itself: asked
        to, it hands the leadership over first and raises ``LeadershipMoved`` (the caller asks
        the new leader)."""
        member = self.members().get(node_id)
        if member is None:
            raise BadRequest(f"unknown raft node {node_id!r}")
        addr = member[0]
        if addr == self.node.settings.bind_addr:
            await self.node.hand_over(self.apply_timeout)
            raise LeadershipMoved(self.leader_id())
        if addr in set(self.node.members()):
            await self.node.remove_voter(addr, self.apply_timeout)
        await self.execute("member_remove", [node_id])

    def status(self) -> dict[str, Any]:
        status = self.node.status()
        status["node_id"] = self.node_id
        status["leader_id"] = self.leader_id()
        levels = self._member_levels()
        status["nodes"] = {
            node_id: {"raft_addr": addr, "api_endpoint": endpoint, "level": levels.get(node_id, 1)}
            for node_id, (addr, endpoint) in sorted(self.members().items())
        }
        status["forwards"] = dict(self.forwards)
        status["command_level"] = C.LEVEL
        status["cluster_level"] = self.cluster_level()
        return status


async def _listening(addr: str, wait: float = 1.0) -> bool:
    """Whether something accepts TCP connections at ``host:port`` (a joining node's Raft port)."""
    host, _, port = addr.rpartition(":")
    try:
        _r, writer = await asyncio.wait_for(
            asyncio.open_connection(host.strip("[]"), int(port)), wait
        )
    except (OSError, ValueError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True
