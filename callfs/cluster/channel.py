"""A follower's WebSocket to the leader, for forwarded commands and read-index questions.

A forwarded command over ``POST /v1/internal/raft/metadata/apply`` costs each side a whole HTTP
request (headers built and parsed, a response object, a connection taken from the pool and given
back): about 0.2 ms of CPU on either node on this project's 2-core test machine, against 0.04 ms
for one WebSocket message each way (bench/README.md). The channel carries the same msgpack
bodies and answers: a request is ``id (8 bytes) + body``, its answer ``id + HTTP-like status
(2 bytes, big-endian) + body``; answers come in any order.

``GET /v1/internal/raft/metadata/channel`` is authenticated like every internal endpoint, when the
WebSocket is opened (over TLS when the API is). A leader that does not know the path (a node of
an earlier build during a rolling upgrade) answers 404 or 405: the caller then uses the POST
endpoint for ``FALLBACK_SECONDS`` before trying again.

The channel is one connection: when it closes (the leader stopped, the network broke, a ping
went unanswered), every question waiting on it fails with ``ChannelLost`` and the next
one opens a new channel. The caller's retry logic decides what a failure means, exactly as for a
failed POST: a command may have been applied, and its retry carries the same request id.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable

import aiohttp

from callfs.concurrency import retrieved

log = logging.getLogger(__name__)

CHANNEL_PATH = "/v1/internal/raft/metadata/channel"
#: A leader without the channel is asked over POST for this long before the channel is tried
#: again.
FALLBACK_SECONDS = 60.0
#: The biggest message either side takes: a 1 MiB body (the POST endpoint's limit) plus framing.
MAX_MESSAGE = (1 << 20) + 16
#: A ping after this long without a message: a channel whose leader vanished without closing
#: it (a host gone, a partition) is closed when the pong does not come within half of it, instead
#: of failing questions one timeout after another. A timed-out question does not close the
#: channel (the others on it may be answered yet); a busy leader has 15 s to answer a ping.
HEARTBEAT = 30.0
_ID = 8
_STATUS = 2


def question_body(message: bytes) -> bytes | None:
    """The body of a question as the leader receives it; None if it is too short to be one."""
    return message[_ID:] if len(message) >= _ID else None


def answer_to(question: bytes, status: int, body: bytes) -> bytes:
    """The leader's answer message to ``question``: the question's id, the status, the body."""
    return question[:_ID] + status.to_bytes(_STATUS, "big") + body


class ChannelLost(Exception):
    """The channel closed, or could not be opened, before the answer came."""


class NoChannel(Exception):
    """The leader does not offer the channel (an earlier build): use the POST endpoint."""


class LeaderChannel:
    """One WebSocket to one leader endpoint, shared by every question to it."""

    def __init__(
        self, endpoint: str, session: Callable[[], aiohttp.ClientSession], secret: str
    ) -> None:
        self.endpoint = endpoint
        self._session = session
        self._secret = secret
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._opening: asyncio.Future[aiohttp.ClientWebSocketResponse] | None = None
        self._reader: asyncio.Future[None] | None = None
        self._waiting: dict[bytes, asyncio.Future[tuple[int, bytes]]] = {}
        self._ids = itertools.count(1)
        self.closed = False

    async def ask(self, body: bytes, seconds: float) -> tuple[int, bytes]:
        """Send ``body``; the leader's ``(status, body)``. ``ChannelLost`` if the channel closes
        first, ``NoChannel`` if the leader has none, ``TimeoutError`` after ``seconds``."""
        async with asyncio.timeout(seconds):
            return await self._ask(body)

    async def _ask(self, body: bytes) -> tuple[int, bytes]:
        ws = await self._connected()
        rid = next(self._ids).to_bytes(_ID, "big")
        answer: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = answer
        try:
            if self.closed:  # ended while this question was on its way in: nobody would answer
                raise ChannelLost("raft leader channel closed")
            await ws.send_bytes(rid + body)
            return await answer
        except (aiohttp.ClientError, ConnectionError, RuntimeError) as exc:
            # RuntimeError: aiohttp's "websocket connection is closing"
            raise ChannelLost(f"raft leader channel lost ({type(exc).__name__})") from exc
        finally:
            self._waiting.pop(rid, None)

    async def _connected(self) -> aiohttp.ClientWebSocketResponse:
        if self.closed:
            raise ChannelLost("raft leader channel closed")
        if self._ws is not None:
            return self._ws
        if self._opening is None:
            self._opening = asyncio.ensure_future(self._open())
            self._opening.add_done_callback(retrieved)
        # shielded: one caller's timeout must not cancel the opening the others wait for
        return await asyncio.shield(self._opening)

    async def _open(self) -> aiohttp.ClientWebSocketResponse:
        try:
            ws = await self._session().ws_connect(
                self.endpoint + CHANNEL_PATH,
                headers={"Authorization": f"Bearer {self._secret}"},
                max_msg_size=MAX_MESSAGE,
                autoping=True,
                heartbeat=HEARTBEAT,
                timeout=aiohttp.ClientWSTimeout(ws_close=5.0),
            )
        except aiohttp.WSServerHandshakeError as exc:
            self.closed = True
            if exc.status in (404, 405):
                raise NoChannel(f"{self.endpoint} has no raft channel") from exc
            raise ChannelLost(f"raft leader channel refused ({exc.status})") from exc
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            self.closed = True
            raise ChannelLost(f"raft leader unreachable ({type(exc).__name__})") from exc
        except asyncio.CancelledError:
            # only ``close`` cancels the opening: its askers learn the channel is gone (a
            # CancelledError would pass their callers' retry logic and abort them)
            self.closed = True
            raise ChannelLost("raft leader channel closed") from None
        except BaseException:
            self.closed = True
            raise
        if self.closed:  # closed while opening
            await ws.close()
            raise ChannelLost("raft leader channel closed")
        self._ws = ws
        self._reader = asyncio.ensure_future(self._read(ws))
        return ws

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        try:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.BINARY or len(msg.data) < _ID + _STATUS:
                    log.warning("raft leader channel: unexpected %s message", msg.type.name)
                    break
                data: bytes = msg.data
                waiter = self._waiting.pop(data[:_ID], None)
                if waiter is not None and not waiter.done():
                    status = int.from_bytes(data[_ID : _ID + _STATUS], "big")
                    waiter.set_result((status, data[_ID + _STATUS :]))
        except Exception as exc:  # a broken connection ends the channel like a close
            log.debug("raft leader channel read failed: %r", exc)
        finally:
            self._end()
            with contextlib.suppress(Exception):
                await ws.close()

    def _end(self) -> None:
        self.closed = True
        waiting, self._waiting = self._waiting, {}
        for waiter in waiting.values():
            if not waiter.done():
                waiter.set_exception(ChannelLost("raft leader channel closed"))
                waiter.exception()  # the asker may have gone: mark it retrieved

    async def close(self) -> None:
        self._end()
        opening, self._opening = self._opening, None
        if opening is not None and not opening.done():
            opening.cancel()
            with contextlib.suppress(BaseException):
                await opening
        ws, self._ws = self._ws, None
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close()
        reader, self._reader = self._reader, None
        if reader is not None:
            with contextlib.suppress(BaseException):
                await reader
