"""``GET /v1/status`` (addition beyond v1, ``docs/ui.md``): what the web interface's cluster page
shows, from data the node already has: the nodes it knows and whether each answers ``/health``
now, the Raft role and leader (Raft mode), the HA replication backlog, the erasure repair
gauges, and the bytes each node keeps on its local disk (``stored_bytes``/``stored_files``, as of
that node's last count: ``callfs_stored_bytes``; null when unknown or unreachable). Authenticated
like all of ``/v1/`` (the pipeline checks the key before routing).

``GET /v1/internal/status/stored`` (internal secret only) is how a node asks a peer for its
figures: ``{"stored_bytes": n|null, "stored_files": n|null}``."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import Gauge

from callfs.api.errors import json_response
from callfs.api.internal_raft import RAFT_SERVICE
from callfs.api.state import ApiState, api_state
from callfs.core.peer import PROBE_TIMEOUT
from callfs.errors import CallFSError

ROUTE = "/v1/status"
STORED_ROUTE = "/v1/internal/status/stored"
_UNKNOWN: dict[str, int | None] = {"stored_bytes": None, "stored_files": None}


def _gauge(gauge: Gauge) -> float:
    """The current value of an unlabelled gauge (through the public ``collect``)."""
    for family in gauge.collect():
        for sample in family.samples:
            return float(sample.value)
    return 0.0


def _sum(gauge: Gauge) -> int | None:
    """The sum over the labels of a labelled gauge; None while no label was ever set."""
    values = [s.value for family in gauge.collect() for s in family.samples]
    return int(sum(values)) if values else None


def _stored_here(state: ApiState) -> dict[str, int | None]:
    return {
        "stored_bytes": _sum(state.metrics.stored_bytes),
        "stored_files": _sum(state.metrics.stored_files),
    }


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


async def _stored_on(state: ApiState, node: str) -> dict[str, int | None]:
    """A peer's own figures (null when it cannot be asked or does not know them yet)."""
    base = state.peers.endpoint(node)
    if base is None:
        return _UNKNOWN
    try:
        async with state.peers.session.get(
            base.rstrip("/") + STORED_ROUTE,
            headers=state.peers.auth_headers(),
            timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT),
        ) as resp:
            if resp.status != 200:
                return _UNKNOWN
            answer = await resp.json()
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError, CallFSError):
        return _UNKNOWN
    if not isinstance(answer, dict):
        return _UNKNOWN
    return {k: _count(answer.get(k)) for k in _UNKNOWN}


def _raft(request: web.Request) -> tuple[dict[str, Any] | None, dict[str, str]]:
    """This node's Raft view (None outside Raft mode) and the members' API endpoints."""
    raft = request.app.get(RAFT_SERVICE)
    if raft is None:
        return None, {}
    try:
        s = raft.status()
    except Exception:  # not running (yet, or any more): the page shows "unknown"
        return {"role": "unknown", "leader": None, "term": None, "has_quorum": False}, {}
    view = {
        "role": s.get("state"),
        "leader": s.get("leader_id"),
        "term": s.get("term"),
        "commit_index": s.get("commit_index"),
        "applied_index": s.get("applied_index"),
        "has_quorum": bool(s.get("has_quorum")),
    }
    return view, raft.endpoints()


async def status(request: web.Request) -> web.StreamResponse:
    state = api_state(request)
    raft, raft_endpoints = _raft(request)
    endpoints = {**state.peers.endpoints, **raft_endpoints}
    endpoints.setdefault(state.instance_id, state.external_url)
    others = sorted(n for n in endpoints if n != state.instance_id)
    # probed together: the page waits for the slowest, at most PROBE_TIMEOUT
    alive, stored = await asyncio.gather(
        asyncio.gather(*(state.peers.alive(n) for n in others)),
        asyncio.gather(*(_stored_on(state, n) for n in others)),
    )
    health = {state.instance_id: True, **dict(zip(others, alive, strict=True))}
    figures = {state.instance_id: _stored_here(state), **dict(zip(others, stored, strict=True))}
    leader = raft["leader"] if raft else None
    nodes = [
        {
            "id": node,
            "endpoint": endpoints[node],
            "self": node == state.instance_id,
            "healthy": health[node],
            "leader": node == leader,
            **(figures[node] if health[node] else _UNKNOWN),
        }
        for node in sorted(endpoints)
    ]
    metrics = state.metrics
    body = {
        "node_id": state.instance_id,
        "raft": raft,
        "leader": leader,
        "nodes": nodes,
        "replication_backlog": int(_gauge(metrics.replication_backlog)),
        "erasure": {
            "degraded_files": int(_gauge(metrics.erasure_degraded)),
            "repair_backlog": int(_gauge(metrics.erasure_repair_backlog)),
        },
    }
    return json_response(body)


async def stored(request: web.Request) -> web.StreamResponse:
    state = api_state(request)
    if not state.auth.is_internal(request.headers.get("Authorization")):
        return web.json_response({"error": "unauthorized"}, status=401)
    return web.json_response(_stored_here(state))


def add_routes(app: web.Application) -> None:
    app.router.add_get(ROUTE, status, allow_head=False)
    app.router.add_get(STORED_ROUTE, stored, allow_head=False)
