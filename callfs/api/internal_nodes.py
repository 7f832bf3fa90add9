"""``/v1/internal/blobs`` and ``/v1/internal/nodes/*``: moves between nodes, drain, rebalance
(issue 14). Authenticated by the internal secret alone (§12.6); JSON answers ``{"error": ...}``.

- ``POST /v1/internal/blobs?size=N``: the body (another node's file) is stored durably here under
  a new blob key; 201 ``{"key": ..., "size": N}``. 400 if the body is not exactly N bytes.
- ``DELETE /v1/internal/blobs/{key}``: remove such a blob if no entry names it (a refused
  commit); 204, or 409 if an entry names it.
- ``POST /v1/internal/nodes/drain`` ``{"node", "parallel", "rate"}`` and
  ``POST /v1/internal/nodes/rebalance`` ``{"tolerance", "parallel", "rate"}``: start the job on
  this node; 202 with the job. 409 ``{"error", "job"}`` while a job runs here. With Raft, jobs
  run on the leader (the coordinator, like the erasure repair pass): another node answers 409
  ``{"error": "not the coordinator", "coordinator_url": ...}`` (503 with no leader known), and
  the CLI asks that node instead.
- ``GET /v1/internal/nodes/job``: the current (or last) job's progress; 404 if none ran.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from callfs.api.numbers import parse_int
from callfs.api.state import api_state
from callfs.cluster.service import RaftService
from callfs.core.peer import BLOBS_PATH
from callfs.core.placement_ops import NodeMoves
from callfs.errors import AlreadyExists, BadRequest, CallFSError

NODE_MOVES = web.AppKey("callfs_node_moves", NodeMoves)
#: With Raft: the service whose leader runs the jobs (absent: any node, the DLM lock decides).
COORDINATOR = web.AppKey("callfs_node_moves_raft", RaftService)
_CHUNK = 256 * 1024
_MAX_BODY = 1 << 16


def _json(status: int, body: dict[str, Any]) -> web.Response:
    return web.json_response(body, status=status)


def _authorized(request: web.Request) -> bool:
    return api_state(request).auth.is_internal(request.headers.get("Authorization"))


async def receive_blob(request: web.Request) -> web.StreamResponse:
    if not _authorized(request):
        return _json(401, {"error": "unauthorized"})
    raw = request.rel_url.query.get("size", "")
    size = parse_int(raw) if raw[:1] not in "+-" else None
    if size is None:  # (a number of thousands of digits made int() raise: a 500)
        return _json(400, {"error": "size is required"})
    if size > api_state(request).max_upload_size > 0:
        return _json(413, {"error": "larger than server.max_upload_size"})
    try:
        key = await api_state(request).engine.receive_blob(
            request.content.iter_chunked(_CHUNK), size
        )
    except BadRequest as exc:
        return _json(400, {"error": exc.message})
    except (ConnectionError, OSError) as exc:
        return _json(400, {"error": f"body read error: {type(exc).__name__}"})
    return _json(201, {"key": key, "size": size})


async def drop_blob(request: web.Request) -> web.StreamResponse:
    if not _authorized(request):
        return _json(401, {"error": "unauthorized"})
    key = request.match_info["key"]
    if not await api_state(request).engine.drop_unnamed_blob(key):
        return _json(409, {"error": "the blob is named by an entry (or not a blob key)"})
    return web.Response(status=204)


async def _body(request: web.Request) -> dict[str, Any]:
    raw = await request.content.read(_MAX_BODY)
    try:
        body = json.loads(raw or b"{}")
    except ValueError as exc:
        raise BadRequest(f"invalid request: {exc}") from exc
    if not isinstance(body, dict):
        raise BadRequest("invalid request: expected a JSON object")
    return body


def _number(body: dict[str, Any], key: str, default: float) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"{key} must be a number")
    return float(value)


async def _start(request: web.Request, kind: str) -> web.StreamResponse:
    if not _authorized(request):
        return _json(401, {"error": "unauthorized"})
    raft = request.app.get(COORDINATOR)
    if raft is not None and not raft.node.is_leader():
        leader = raft.leader_endpoint()
        if not leader:
            return _json(503, {"error": "no Raft leader known; try again"})
        return _json(409, {"error": "not the coordinator", "coordinator_url": leader})
    moves = request.app[NODE_MOVES]
    try:
        body = await _body(request)
        parallel = int(_number(body, "parallel", 2))
        rate = _number(body, "rate", 0)
        if kind == "drain":
            node = body.get("node")
            if not isinstance(node, str) or not node.strip():
                raise BadRequest("node is required")
            job = moves.start_drain(node.strip(), parallel, rate)
        else:
            job = moves.start_rebalance(_number(body, "tolerance", 0.1), parallel, rate)
    except AlreadyExists as exc:
        current = moves.job.as_dict() if moves.job is not None else None
        return _json(409, {"error": exc.message, "job": current})
    except CallFSError as exc:
        return _json(400, {"error": exc.message})
    return _json(202, job.as_dict())


async def drain(request: web.Request) -> web.StreamResponse:
    return await _start(request, "drain")


async def rebalance(request: web.Request) -> web.StreamResponse:
    return await _start(request, "rebalance")


async def job(request: web.Request) -> web.StreamResponse:
    if not _authorized(request):
        return _json(401, {"error": "unauthorized"})
    current = request.app[NODE_MOVES].job
    if current is None:
        return _json(404, {"error": "no drain or rebalance has run on this node"})
    return _json(200, current.as_dict())


def add_routes(app: web.Application, moves: NodeMoves, raft: RaftService | None = None) -> None:
    app[NODE_MOVES] = moves
    if raft is not None:
        app[COORDINATOR] = raft

    async def cleanup(_app: web.Application) -> None:
        await moves.close()  # the app owns the job: shutdown cancels it (re-run resumes)

    app.on_cleanup.append(cleanup)
    app.router.add_post(BLOBS_PATH, receive_blob)
    app.router.add_delete(BLOBS_PATH + "/{key}", drop_blob)
    app.router.add_post("/v1/internal/nodes/drain", drain)
    app.router.add_post("/v1/internal/nodes/rebalance", rebalance)
    app.router.add_get("/v1/internal/nodes/job", job, allow_head=False)
