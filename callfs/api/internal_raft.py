"""``/v1/internal/raft/*`` (API.md §12.6; Raft mode only). Authenticated by the internal secret
alone (API keys are not accepted); outside the public pipeline.

- ``POST join``: contract shape (JSON, trailing newline).
- ``POST metadata/apply``: msgpack, internal to this implementation (commands forwarded by
  followers, and the read barrier's commit-index question).
- ``GET metadata/channel``: the same questions and answers over one WebSocket per follower
  (``cluster/channel.py``), much cheaper per question than a request each.
- ``GET status`` and ``POST remove`` (additions, used by ``callfs cluster status/remove``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from callfs.api.state import api_state
from callfs.cluster.channel import (
    CHANNEL_PATH,
    HEARTBEAT,
    MAX_MESSAGE,
    answer_to,
    question_body,
)
from callfs.cluster.raft import NotApplied, OutcomeUnknown
from callfs.cluster.service import MSGPACK, LeadershipMoved, RaftService
from callfs.errors import BadRequest, CallFSError
from callfs.metadata import raft_commands as C

log = logging.getLogger(__name__)

RAFT_SERVICE = web.AppKey("callfs_raft", RaftService)
CHANNELS = web.AppKey("callfs_raft_channels", set[web.WebSocketResponse])
_MAX_BODY = 1 << 20


def _json(status: int, body: dict[str, Any]) -> web.Response:
    return web.Response(
        status=status,
        body=(json.dumps(body, separators=(",", ":")) + "\n").encode(),
        content_type="application/json",
    )


def _authorized(request: web.Request) -> bool:
    return api_state(request).auth.is_internal(request.headers.get("Authorization"))


async def _body(request: web.Request) -> bytes | None:
    if request.content_length is not None and request.content_length > _MAX_BODY:
        return None
    data = await request.content.read(_MAX_BODY + 1)
    return None if len(data) > _MAX_BODY else data


async def join(request: web.Request) -> web.StreamResponse:
    if not _authorized(request):
        return _json(401, {"status": "error", "error": "unauthorized"})
    raft = request.app[RAFT_SERVICE]
    leader_id = raft.leader_id()

    def fail(status: int, error: str) -> web.Response:
        body: dict[str, Any] = {"status": "error", "error": error}
        if leader_id:
            body["leader_id"] = leader_id
        return _json(status, body)

    raw = await _body(request)
    if raw is None:
        return fail(400, "invalid request: body larger than 1 MiB")
    try:
        body = json.loads(raw)
        if not isinstance(body, dict):
            raise ValueError("expected a JSON object")
    except ValueError as exc:
        return _json(400, {"status": "error", "error": f"invalid request: {exc}"})
    fields = [body.get(k) for k in ("node_id", "raft_addr", "api_endpoint")]
    if any(v is not None and not isinstance(v, str) for v in fields):
        # a number as node_id had made a real voter named "5"
        return fail(400, "node_id, raft_addr and api_endpoint must be strings")
    node_id, raft_addr, api_endpoint = ((v or "").strip() for v in fields)
    if not node_id or not raft_addr:
        return fail(400, "node_id and raft_addr are required")
    if not raft.node.is_leader():
        return fail(502, "not leader")
    try:
        await raft.join(node_id, raft_addr, api_endpoint)
    except BadRequest as exc:
        return fail(400, exc.message)
    except (CallFSError, NotApplied, OutcomeUnknown) as exc:
        return fail(502, str(exc))
    answer: dict[str, Any] = {"status": "joined"}
    if raft.node_id:
        answer["leader_id"] = raft.node_id
    return _json(200, answer)


async def remove(request: web.Request) -> web.StreamResponse:
    if not _authorized(request):
        return _json(401, {"status": "error", "error": "unauthorized"})
    raft = request.app[RAFT_SERVICE]
    raw = await _body(request)
    try:
        body = json.loads(raw or b"")
        node_id = str(body.get("node_id") or "").strip()
    except (ValueError, AttributeError):
        return _json(400, {"status": "error", "error": 'invalid request: expected {"node_id"}'})
    if not node_id:
        return _json(400, {"status": "error", "error": "node_id is required"})
    if not raft.node.is_leader():
        return _json(502, {"status": "error", "error": "not leader", "leader_id": raft.leader_id()})
    try:
        await raft.remove(node_id)
    except LeadershipMoved as moved:  # it was the leader: the new one removes it
        return _json(502, {"status": "error", "error": "not leader", "leader_id": moved.leader_id})
    except BadRequest as exc:
        return _json(400, {"status": "error", "error": exc.message})
    except (CallFSError, NotApplied, OutcomeUnknown) as exc:
        return _json(502, {"status": "error", "error": str(exc)})
    return _json(200, {"status": "removed", "node_id": node_id})


async def status(request: web.Request) -> web.StreamResponse:
    if not _authorized(request):
        return _json(401, {"status": "error", "error": "unauthorized"})
    return _json(200, request.app[RAFT_SERVICE].status())


async def apply(request: web.Request) -> web.StreamResponse:
    if not _authorized(request):
        return _json(401, {"error": "unauthorized"})
    raw = await _body(request)
    if raw is None:
        return _json(413, {"error": "command too large"})
    code, body = await request.app[RAFT_SERVICE].serve_apply(raw)
    return web.Response(status=code, body=body, content_type=MSGPACK)


async def channel(request: web.Request) -> web.StreamResponse:
    """A follower's channel (``cluster/channel.py``): each message ``id + body`` is answered by
    ``id + status (2 bytes) + body``, as ``apply`` would answer that body, in any order."""
    if not _authorized(request):
        return _json(401, {"error": "unauthorized"})
    raft = request.app[RAFT_SERVICE]
    # This end pings too, as the follower does: a follower whose host vanished without closing
    # is dropped after one unanswered ping, instead of holding its handler until TCP gives up.
    ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE, autoping=True, heartbeat=HEARTBEAT)
    await ws.prepare(request)
    channels = request.app[CHANNELS]
    channels.add(ws)
    running: set[asyncio.Task[None]] = set()

    async def answer(data: bytes, question: bytes) -> None:
        try:
            code, body = await raft.serve_apply(question)
        except Exception:  # what ``apply`` would have answered with a 500
            log.exception("raft channel: a forwarded question failed")
            code, body = 500, C.pack({"error": "internal error"})
        if not ws.closed:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await ws.send_bytes(answer_to(data, code, body))

    try:
        async for msg in ws:
            question = question_body(msg.data) if msg.type == WSMsgType.BINARY else None
            if question is None:
                log.warning("raft channel from %s: unexpected %s message", request.remote, msg.type)
                break
            task = asyncio.ensure_future(answer(msg.data, question))
            running.add(task)
            task.add_done_callback(running.discard)
    finally:
        channels.discard(ws)
        await ws.close()
        # A command already in the leader's hands goes on to its commit (bounded by
        # raft.forward_timeout); only its answer is dropped, and the follower retries it with the
        # same request id. Waited for here, so a shutdown drains them as it drains requests.
        if running:
            await asyncio.gather(*running, return_exceptions=True)
    return ws


async def _close_channels(app: web.Application) -> None:
    """Shutdown: end every follower's channel now (an open one would hold the server's drain
    for its whole timeout)."""
    channels = app[CHANNELS]
    for ws in list(channels):
        with contextlib.suppress(Exception):
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")


def add_routes(app: web.Application, raft: RaftService) -> None:
    app[RAFT_SERVICE] = raft
    channels: set[web.WebSocketResponse] = set()
    app[CHANNELS] = channels
    app.on_shutdown.append(_close_channels)
    app.router.add_get(CHANNEL_PATH, channel, allow_head=False)
    app.router.add_post("/v1/internal/raft/join", join)
    app.router.add_post("/v1/internal/raft/metadata/apply", apply)
    app.router.add_post("/v1/internal/raft/remove", remove)
    app.router.add_get("/v1/internal/raft/status", status, allow_head=False)
