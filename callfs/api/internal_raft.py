"""``/v1/internal/raft/*`` (API.md §12.6; Raft mode only). Authenticated by the internal secret
alone (API keys are not accepted); outside the public pipeline.

- ``POST join``: contract shape (JSON, trailing newline).
- ``POST metadata/apply``: msgpack, internal to this implementation (commands forwarded by
  followers, and the read barrier's commit-index question).
- ``GET status`` and ``POST remove`` (additions, used by ``callfs cluster status/remove``).
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from callfs.api.state import api_state
from callfs.cluster.raft import NotApplied, OutcomeUnknown
from callfs.cluster.service import MSGPACK, RaftService
from callfs.errors import BadRequest, CallFSError

RAFT_SERVICE = web.AppKey("callfs_raft", RaftService)
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
    node_id = str(body.get("node_id") or "").strip()
    raft_addr = str(body.get("raft_addr") or "").strip()
    api_endpoint = str(body.get("api_endpoint") or "").strip()
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


def add_routes(app: web.Application, raft: RaftService) -> None:
    app[RAFT_SERVICE] = raft
    app.router.add_post("/v1/internal/raft/join", join)
    app.router.add_post("/v1/internal/raft/metadata/apply", apply)
    app.router.add_post("/v1/internal/raft/remove", remove)
    app.router.add_get("/v1/internal/raft/status", status, allow_head=False)
