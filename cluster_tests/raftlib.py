"""A Raft cluster of real ``callfs server`` processes: no database server, no Redis."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from cluster_tests.harness import API_KEY, INTERNAL, ClusterNode, free_ports, node_config

H = {"Authorization": f"Bearer {API_KEY}"}


def raft_cluster(workdir: Path, n: int = 3, names: list[str] | None = None) -> list[ClusterNode]:
    """``n`` node configs (not started): node-1 bootstraps, every node lists every member."""
    names = names or [f"node-{i + 1}" for i in range(n)]
    ports = free_ports(2 * len(names))
    api = dict(zip(names, ports[: len(names)], strict=True))
    raft = dict(zip(names, ports[len(names) :], strict=True))
    endpoints = {k: f"http://127.0.0.1:{p}" for k, p in api.items()}
    addrs = {k: f"127.0.0.1:{p}" for k, p in raft.items()}
    nodes = []
    for i, name in enumerate(names):
        cfg = node_config(name, api[name], workdir, endpoints, {"type": "raft"}, {"type": "local"})
        cfg["raft"] = raft_section(name, addrs, endpoints, workdir, bootstrap=i == 0)
        nodes.append(ClusterNode(name, api[name], workdir, cfg))
    return nodes


def raft_section(
    name: str,
    addrs: dict[str, str],
    endpoints: dict[str, str],
    workdir: Path,
    bootstrap: bool,
) -> dict[str, Any]:
    return {
        "enabled": True,
        "bootstrap": bootstrap,
        "node_id": name,
        "bind_addr": addrs[name],
        "data_dir": str(workdir / name / "raft"),
        "peers": dict(addrs),
        "api_peer_endpoints": dict(endpoints),
        "apply_timeout": "5s",
        "forward_timeout": "5s",
    }


def raft_status(node: ClusterNode, timeout: float = 2.0) -> dict[str, Any]:
    req = urllib.request.Request(
        node.base + "/v1/internal/raft/status", headers={"Authorization": f"Bearer {INTERNAL}"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        out: dict[str, Any] = json.loads(resp.read())
        return out


def wait_leader(
    nodes: list[ClusterNode],
    timeout: float = 20.0,
    exclude: set[str] | frozenset[str] = frozenset(),
) -> ClusterNode:
    """The node every live node agrees is leader (never one in ``exclude``: a dead leader's
    stale address is still reported for a while)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            views = [raft_status(n) for n in nodes if n.name not in exclude]
            leaders = {v["leader_id"] for v in views}
            last = views
            if len(leaders) == 1:
                leader = leaders.pop()
                chosen = [n for n in nodes if n.name == leader and n.name not in exclude]
                if chosen:  # (the asked nodes may still name a frozen or dead leader)
                    return chosen[0]
        except (urllib.error.URLError, OSError, ValueError) as exc:
            last = exc
        time.sleep(0.1)
    raise AssertionError(f"no agreed leader in {timeout}s: {last}")
