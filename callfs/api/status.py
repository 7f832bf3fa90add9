"""``GET /v1/status`` (addition beyond v1, ``docs/ui.md``): what the web interface's cluster page
shows, from data the node already has: the nodes it knows and whether each answers ``/health``
now, the Raft role and leader (Raft mode), the HA replication backlog and the erasure repair
gauges. Authenticated like all of ``/v1/`` (the pipeline checks the key before routing)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from prometheus_client import Gauge

from callfs.api.errors import json_response
from callfs.api.internal_raft import RAFT_SERVICE
from callfs.api.state import api_state

ROUTE = "/v1/status"


def _gauge(gauge: Gauge) -> float:
    """The current value of an unlabelled gauge (through the public ``collect``)."""
    for family in gauge.collect():
        for sample in family.samples:
            return float(sample.value)
    return 0.0


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
    alive = await asyncio.gather(*(state.peers.alive(n) for n in others))
    health = {state.instance_id: True, **dict(zip(others, alive, strict=True))}
    leader = raft["leader"] if raft else None
    nodes = [
        {
            "id": node,
            "endpoint": endpoints[node],
            "self": node == state.instance_id,
            "healthy": health[node],
            "leader": node == leader,
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


def add_routes(app: web.Application) -> None:
    app.router.add_get(ROUTE, status, allow_head=False)
