"""Raft gauges and the commit-latency histogram, in the node's own registry (``/metrics``)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from callfs.cluster.service import RaftService

_ROLES = {"follower": 0, "candidate": 1, "leader": 2}


class RaftCollector(Collector):
    def __init__(self, service: RaftService) -> None:
        self._service = service

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            s = self._service.node.status()
        except Exception:  # not running (yet, or any more): no samples rather than a failed scrape
            return
        role = GaugeMetricFamily(
            "callfs_raft_state", "This node's Raft role: 0 follower, 1 candidate, 2 leader."
        )
        role.add_metric([], _ROLES.get(str(s["state"]), -1))
        yield role
        for name, key, doc in (
            ("callfs_raft_term", "term", "Current Raft term."),
            ("callfs_raft_commit_index", "commit_index", "Highest committed log index known."),
            ("callfs_raft_applied_index", "applied_index", "Highest log index applied here."),
            ("callfs_raft_log_entries", "log_len", "Entries in the log since the snapshot."),
            ("callfs_raft_snapshots_total", "snapshots_taken", "Snapshots taken by this node."),
            (
                "callfs_raft_snapshot_copies_total",
                "snapshot_copies",
                "Snapshots that copied the whole database (the others appended the commands).",
            ),
            (
                "callfs_raft_snapshot_transfers_dropped_total",
                "snapshot_transfers_dropped",
                "Snapshot transfers dropped: a deposed leader's, or to a removed node.",
            ),
            ("callfs_raft_journal_syncs_total", "journal_syncs", "Group fsyncs of the log."),
        ):
            gauge = GaugeMetricFamily(name, doc)
            gauge.add_metric([], float(s.get(key) or 0))
            yield gauge
        has_leader = GaugeMetricFamily("callfs_raft_has_leader", "1 if a leader is known.")
        has_leader.add_metric([], 1.0 if s.get("leader") else 0.0)
        yield has_leader
        members = GaugeMetricFamily("callfs_raft_members", "Voters in the group.")
        members.add_metric([], float(len(s.get("members") or [])))
        yield members
        connected = GaugeMetricFamily(
            "callfs_raft_connected_peers", "Other voters this node is connected to."
        )
        connected.add_metric([], float(len(s.get("connected") or [])))
        yield connected
        broken = GaugeMetricFamily(
            "callfs_raft_replica_broken", "1 if this replica stopped serving (see the log)."
        )
        broken.add_metric([], 1.0 if s.get("broken") else 0.0)
        yield broken


def register(service: RaftService, registry: CollectorRegistry) -> None:
    registry.register(RaftCollector(service))
    commit = Histogram(
        "callfs_raft_commit_duration_seconds",
        "Time from proposing a metadata command to its result (forwarding included).",
        buckets=(0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
        registry=registry,
    )
    service.on_commit = commit.observe
