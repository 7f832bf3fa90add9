"""The follower's WebSocket to the leader (``cluster/channel.py``), against real aiohttp servers
that behave as a leader of this build would, as one of an earlier build (no channel), and as a
leader that dies or stalls mid-question. The whole path through real nodes is covered by
``cluster_tests/test_raft.py`` (the status counters show the channel carried the forwards)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from types import SimpleNamespace

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from callfs.api import internal_raft
from callfs.api.internal_raft import CHANNELS, add_routes
from callfs.api.state import STATE
from callfs.auth.keys import Authenticator
from callfs.cluster.channel import CHANNEL_PATH, ChannelLost, LeaderChannel, NoChannel
from callfs.metadata import raft_commands as C

SECRET = "internal-secret-for-the-channel-tests"
Handler = Callable[[web.WebSocketResponse, bytes], Awaitable[None]]


async def _serve(handler: Handler | None) -> TestServer:
    async def channel(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {SECRET}":
            return web.Response(status=401)
        assert handler is not None
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            await handler(ws, msg.data)
        return ws

    app = web.Application()
    if handler is not None:
        app.router.add_get(CHANNEL_PATH, channel)
    server = TestServer(app)
    await server.start_server()
    return server


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def _channel(
    server: TestServer, session: aiohttp.ClientSession, secret: str = SECRET
) -> LeaderChannel:
    return LeaderChannel(str(server.make_url("")).rstrip("/"), lambda: session, secret)


async def test_answers_are_matched_to_their_questions_in_any_order(
    session: aiohttp.ClientSession,
) -> None:
    held: list[bytes] = []

    async def reverse_pairs(ws: web.WebSocketResponse, data: bytes) -> None:
        held.append(data)
        if len(held) == 2:  # answer the second question first
            for q in reversed(held):
                await ws.send_bytes(q[:8] + (200).to_bytes(2, "big") + b"re:" + q[8:])
            held.clear()

    server = await _serve(reverse_pairs)
    channel = _channel(server, session)
    try:
        answers = await asyncio.gather(*(channel.ask(f"q{i}".encode(), 5) for i in range(6)))
        assert answers == [(200, f"re:q{i}".encode()) for i in range(6)]
    finally:
        await channel.close()
        await server.close()


async def test_a_leader_without_the_channel_says_so(session: aiohttp.ClientSession) -> None:
    server = await _serve(None)  # an earlier build: 404 on the path
    channel = _channel(server, session)
    try:
        with pytest.raises(NoChannel):
            await channel.ask(b"q", 5)
        assert channel.closed
    finally:
        await channel.close()
        await server.close()


async def test_a_wrong_secret_is_refused_not_taken_for_an_old_leader(
    session: aiohttp.ClientSession,
) -> None:
    async def echo(ws: web.WebSocketResponse, data: bytes) -> None:
        await ws.send_bytes(data[:8] + (200).to_bytes(2, "big") + data[8:])

    server = await _serve(echo)
    channel = _channel(server, session, secret="not-the-secret")
    try:
        with pytest.raises(ChannelLost, match="401"):
            await channel.ask(b"q", 5)
    finally:
        await channel.close()
        await server.close()


async def test_questions_fail_at_once_when_the_leader_goes_away(
    session: aiohttp.ClientSession,
) -> None:
    got = asyncio.Event()

    async def close_after_two(ws: web.WebSocketResponse, data: bytes) -> None:
        if data[8:] == b"second":
            got.set()
            await ws.close()

    server = await _serve(close_after_two)
    channel = _channel(server, session)
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        results = await asyncio.gather(
            channel.ask(b"first", 30), channel.ask(b"second", 30), return_exceptions=True
        )
        assert got.is_set()
        assert all(isinstance(r, ChannelLost) for r in results), results
        assert loop.time() - started < 5  # not the 30 s timeout
        assert channel.closed
        with pytest.raises(ChannelLost):
            await channel.ask(b"third", 5)  # a closed channel is replaced by its owner
    finally:
        await channel.close()
        await server.close()


async def test_an_unanswered_question_times_out_and_is_forgotten(
    session: aiohttp.ClientSession,
) -> None:
    async def silent(ws: web.WebSocketResponse, data: bytes) -> None:
        return None

    server = await _serve(silent)
    channel = _channel(server, session)
    try:
        with pytest.raises(TimeoutError):
            await channel.ask(b"q", 0.3)
        assert channel._waiting == {}
        assert not channel.closed  # a slow answer is not a lost channel
    finally:
        await channel.close()
        await server.close()


async def test_an_unreachable_leader_is_a_lost_channel(session: aiohttp.ClientSession) -> None:
    server = await _serve(None)
    url = str(server.make_url("")).rstrip("/")
    await server.close()  # nothing listens there any more
    channel = LeaderChannel(url, lambda: session, SECRET)
    with pytest.raises(ChannelLost, match="unreachable"):
        await channel.ask(b"q", 5)
    await channel.close()


async def test_one_question_timing_out_leaves_the_others_answered(
    session: aiohttp.ClientSession,
) -> None:
    later_answers: list[asyncio.Future[None]] = []

    async def slow(ws: web.WebSocketResponse, data: bytes) -> None:
        async def later() -> None:
            await asyncio.sleep(0.5)
            await ws.send_bytes(data[:8] + (200).to_bytes(2, "big") + data[8:])

        later_answers.append(asyncio.ensure_future(later()))

    server = await _serve(slow)
    channel = _channel(server, session)
    try:
        short, long = await asyncio.gather(
            channel.ask(b"short", 0.1), channel.ask(b"long", 5), return_exceptions=True
        )
        assert isinstance(short, TimeoutError)
        assert long == (200, b"long")
    finally:
        await channel.close()
        await server.close()


async def test_closing_a_channel_still_opening_fails_its_askers_as_lost(
    session: aiohttp.ClientSession,
) -> None:
    """A frozen leader never completes the upgrade; when a new leader is known the channel is
    closed, and the questions waiting on it must fail as a lost channel (retried by their
    callers), not as cancelled."""
    arrived = asyncio.Event()

    async def frozen(request: web.Request) -> web.StreamResponse:
        arrived.set()
        await asyncio.sleep(30)
        return web.Response()

    app = web.Application()
    app.router.add_get(CHANNEL_PATH, frozen)
    server = TestServer(app)
    await server.start_server()
    channel = _channel(server, session)
    try:
        asker = asyncio.ensure_future(channel.ask(b"q", 20))
        await asyncio.wait_for(arrived.wait(), 5)
        await channel.close()
        with pytest.raises(ChannelLost):
            await asyncio.wait_for(asker, 5)
    finally:
        await channel.close()
        await server.close()


class _Leader:
    """The leader's side as ``RaftService.serve_apply`` presents it to the real channel handler:
    ``boom`` fails unexpectedly, anything else is echoed."""

    async def serve_apply(self, body: bytes) -> tuple[int, bytes]:
        if body == b"boom":
            raise RuntimeError("a bug in the leader")
        return 200, b"re:" + body


async def _leader_server() -> tuple[TestServer, set[web.WebSocketResponse]]:
    """The real leader handler (``api/internal_raft.py``) on a real server."""
    app = web.Application()
    app[STATE] = SimpleNamespace(auth=Authenticator([], {}, SECRET))  # type: ignore[misc]
    add_routes(app, _Leader())  # type: ignore[arg-type]
    server = TestServer(app)
    await server.start_server()
    return server, app[CHANNELS]


async def test_an_unexpected_leader_error_answers_500_and_the_channel_goes_on(
    session: aiohttp.ClientSession,
) -> None:
    server, _ = await _leader_server()
    channel = _channel(server, session)
    try:
        failed, fine = await asyncio.gather(channel.ask(b"boom", 5), channel.ask(b"ok", 5))
        assert failed == (500, C.pack({"error": "internal error"}))
        assert fine == (200, b"re:ok")
        assert await channel.ask(b"again", 5) == (200, b"re:again")
        assert not channel.closed
    finally:
        await channel.close()
        await server.close()


async def test_the_leader_drops_a_follower_that_stopped_answering_pings(
    session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A follower whose host vanished sends no close; the leader's own ping finds it."""
    monkeypatch.setattr(internal_raft, "HEARTBEAT", 0.2)
    server, channels = await _leader_server()
    try:
        url = server.make_url(CHANNEL_PATH)
        auth = {"Authorization": f"Bearer {SECRET}"}
        async with session.ws_connect(url, headers=auth, autoping=False) as ws:
            await ws.send_bytes((1).to_bytes(8, "big") + b"hello")
            answer = await asyncio.wait_for(ws.receive(), 5)  # the channel works...
            assert answer.type == aiohttp.WSMsgType.BINARY and answer.data.endswith(b"re:hello")
            assert len(channels) == 1
            # ...then this end goes silent: pings stay unanswered, and the leader lets go
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5
            while channels and loop.time() < deadline:
                await asyncio.sleep(0.05)
            assert not channels, "the leader still holds a channel to a silent follower"
    finally:
        await server.close()


class _JoinLeader:
    """The leader as ``POST /v1/internal/raft/join`` sees it: records the joins it is asked."""

    node_id = "node-1"

    def __init__(self) -> None:
        self.joined: list[tuple[str, str, str]] = []
        self.node = SimpleNamespace(is_leader=lambda: True)

    def leader_id(self) -> str:
        return self.node_id

    async def join(self, node_id: str, raft_addr: str, api_endpoint: str) -> None:
        self.joined.append((node_id, raft_addr, api_endpoint))


async def test_a_join_with_fields_that_are_not_strings_is_400(
    session: aiohttp.ClientSession,
) -> None:
    """§12.6's body is ``{"node_id":str,"raft_addr":str,"api_endpoint":str}``: a number as
    ``node_id`` had joined a voter named "5"."""
    app = web.Application()
    app[STATE] = SimpleNamespace(auth=Authenticator([], {}, SECRET))  # type: ignore[misc]
    leader = _JoinLeader()
    add_routes(app, leader)  # type: ignore[arg-type]
    server = TestServer(app)
    await server.start_server()
    url = str(server.make_url("/v1/internal/raft/join"))
    headers = {"Authorization": f"Bearer {SECRET}"}
    try:
        for body in (
            {"node_id": 5, "raft_addr": "127.0.0.1:1"},
            {"node_id": "n", "raft_addr": ["127.0.0.1:1"]},
            {"node_id": "n", "raft_addr": "127.0.0.1:1", "api_endpoint": 7},
        ):
            async with session.post(url, json=body, headers=headers) as resp:
                assert resp.status == 400, body
                answer = await resp.json()
                assert answer["status"] == "error" and answer["leader_id"] == "node-1"
        assert leader.joined == []
        ok = {"node_id": "n", "raft_addr": "127.0.0.1:1", "api_endpoint": "http://h:1/"}
        async with session.post(url, json=ok, headers=headers) as resp:
            assert resp.status == 200
            assert await resp.read() == b'{"status":"joined","leader_id":"node-1"}\n'
        assert leader.joined == [("n", "127.0.0.1:1", "http://h:1/")]
    finally:
        await server.close()
