"""Prometheus metrics of API.md §16, one private registry per node (tests build many nodes)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Gauge,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client import Counter as _Counter
from prometheus_client import Histogram as _Histogram
from prometheus_client.gc_collector import GCCollector
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

#: §16's "default buckets" are v1's: client_golang's ``DefBuckets`` (prometheus_client's own
#: default adds 0.075, 0.75 and 7.5, which dashboards built on v1's ``le`` values do not know).
DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# v1 exported no ``*_created`` series; §16 lists none (prometheus_client adds one per counter
# and histogram unless told not to; the setting is the library's, for the whole process)
disable_created_metrics()  # type: ignore[no-untyped-call]


class _CachedLabels:
    """``labels(*values)`` answered from a dict of the children already made, keyed by the values
    as passed: the hot path asks for the same few label sets on every request, and
    prometheus_client's own lookup validates, converts to ``str`` and takes a lock each time.
    Keyword calls and first uses go to prometheus_client. Children are never removed here
    (nothing calls ``remove``/``clear``), so a cached child is always the registered one."""

    _by_values: dict[tuple[object, ...], object]

    def labels(self, *labelvalues: object, **labelkwargs: object) -> Any:
        if labelkwargs or not labelvalues:
            return super().labels(*labelvalues, **labelkwargs)  # type: ignore[misc]
        try:
            cache = self._by_values
        except AttributeError:
            cache = self._by_values = {}
        child = cache.get(labelvalues)
        if child is None:
            child = cache[labelvalues] = super().labels(*labelvalues)  # type: ignore[misc]
        return child


class Counter(_CachedLabels, _Counter):
    pass


class Histogram(_CachedLabels, _Histogram):
    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Iterable[str] = (),
        *,
        buckets: Sequence[float | str] = DEFAULT_BUCKETS,
        **kw: Any,
    ) -> None:
        super().__init__(name, documentation, labelnames, buckets=buckets, **kw)


class Metrics:
    def __init__(self) -> None:
        reg = self.registry = CollectorRegistry()
        ProcessCollector(registry=reg)
        PlatformCollector(registry=reg)
        GCCollector(registry=reg)
        self.http_requests = Counter(
            "callfs_http_requests_total",
            "HTTP requests by method, route template and status.",
            ["method", "path", "status_code"],
            registry=reg,
        )
        self.http_duration = Histogram(
            "callfs_http_request_duration_seconds",
            "HTTP request duration by method and route template.",
            ["method", "path"],
            registry=reg,
        )
        self.file_ops = Counter(
            "callfs_file_operations_total",
            "File operations by kind and backend.",
            ["operation", "backend_type"],
            registry=reg,
        )
        self.backend_duration = Histogram(
            "callfs_backend_op_duration_seconds",
            "Backend byte operation duration.",
            ["backend_type", "operation"],
            registry=reg,
        )
        self.backend_ops = Counter(
            "callfs_backend_ops_total",
            "Backend operations.",
            ["backend_type", "operation"],
            registry=reg,
        )
        self.link_generations = Counter(
            "callfs_single_use_link_generations_total",
            "Single-use links generated.",
            registry=reg,
        )
        self.link_consumptions = Counter(
            "callfs_single_use_link_consumptions_total",
            "Single-use link redemptions by outcome.",
            ["status"],
            registry=reg,
        )
        self.metadata_queries = Counter(
            "callfs_metadata_db_queries_total",
            "Metadata store calls.",
            ["operation"],
            registry=reg,
        )
        self.metadata_duration = Histogram(
            "callfs_metadata_db_query_duration_seconds",
            "Metadata store call duration.",
            ["operation"],
            registry=reg,
        )
        self.lock_ops = Counter(
            "callfs_lock_operations_total",
            "Lock acquires and releases by outcome.",
            ["operation", "status"],
            registry=reg,
        )
        self.lock_duration = Histogram(
            "callfs_lock_operation_duration_seconds",
            "Lock acquire and release duration.",
            ["operation"],
            registry=reg,
        )
        self.active_locks = Gauge(
            "callfs_active_locks", "Locks this node currently holds.", registry=reg
        )
        self.replication_backlog = Gauge(
            "callfs_replication_backlog",
            "Changes queued for the HA replica and not yet applied.",
            registry=reg,
        )
        self.errors = Counter(
            "callfs_errors_total",
            "5xx answers and logged internal failures.",
            ["component", "error_type"],
            registry=reg,
        )
        self.erasure_degraded = Gauge(
            "callfs_erasure_files_degraded",
            "Erasure-coded files the last repair pass left without full redundancy (it could not"
            " rebuild them, or waits for a holder that is down).",
            registry=reg,
        )
        self.erasure_repair_backlog = Gauge(
            "callfs_erasure_repair_backlog",
            "Erasure-coded files the running repair pass has yet to check.",
            registry=reg,
        )
        self.erasure_shards_repaired = Counter(
            "callfs_erasure_shards_repaired_total",
            "Erasure shards rebuilt onto live nodes, or moved to spread a file again.",
            registry=reg,
        )
        # docs/security.md "Limits": what the listener refused or cut off.
        self.connections_rejected = Counter(
            "callfs_connections_rejected_total",
            "Connections closed on arrival: max_connections or max_connections_per_ip.",
            ["reason"],
            registry=reg,
        )
        self.connections_timed_out = Counter(
            "callfs_connections_timed_out_total",
            "Connections cut off: header_wait, write_stall or websocket_idle.",
            ["reason"],
            registry=reg,
        )
        # issue 14: moves between nodes, ``callfs cluster drain`` and ``callfs cluster rebalance``
        self.node_moves_files = Counter(
            "callfs_node_moves_files_total",
            "Files moved to another owner node, by job (patch, drain, rebalance).",
            ["job"],
            registry=reg,
        )
        self.node_moves_bytes = Counter(
            "callfs_node_moves_bytes_total",
            "Bytes moved to another owner node, by job (patch, drain, rebalance).",
            ["job"],
            registry=reg,
        )
        self.node_moves_remaining = Gauge(
            "callfs_node_moves_remaining",
            "Files the running drain or rebalance job has still to move (0 when none runs).",
            ["job"],
            registry=reg,
        )
        # issue 17: bytes per node on the cluster page. Set by the orphan sweep (and a count at
        # start); no sample at all until the first count finished (the page shows "unknown").
        self.stored_bytes = Gauge(
            "callfs_stored_bytes",
            "Bytes on this node's local disk by area (blobs, replica, shards), at the last count.",
            ["area"],
            registry=reg,
        )
        self.stored_files = Gauge(
            "callfs_stored_files",
            "Objects on this node's local disk by area (blobs, replica, shards), at last count.",
            ["area"],
            registry=reg,
        )

        self.worker_processes = Gauge(
            "callfs_worker_processes",
            "Processes serving this node (server.workers), as of this scrape.",
            registry=reg,
        )
        self.worker_processes.set(1)  # each process counts itself; a node's sum is its total
        self.worker_restarts = Counter(
            "callfs_worker_restarts_total",
            "Worker processes started again after they died.",
            registry=reg,
        )
        #: Set on a primary with workers: adds their expositions to its own (``merge_expositions``).
        self.gather: Callable[[bytes], Awaitable[bytes]] | None = None

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    async def node_exposition(self) -> bytes:
        """What ``/metrics`` serves: this process's metrics, or its node's on a primary."""
        own = self.exposition()
        return own if self.gather is None else await self.gather(own)


#: Families that describe one process (memory, CPU, GC): a node's are its primary process's.
_PER_PROCESS = ("process_", "python_")


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


#: Families whose samples only ever grow while their process lives (``monotonic_only``).
_MONOTONIC = ("counter", "histogram", "summary")


def monotonic_only(text: bytes) -> bytes:
    """The counter, histogram and summary families of an exposition (no gauges, no process
    figures): what a worker process counted, kept in the node's sums once it is gone."""
    kept = [
        family
        for family in text_string_to_metric_families(text.decode())
        if family.type in _MONOTONIC and not family.name.startswith(_PER_PROCESS)
    ]
    return generate_latest(_Families(kept))


def merge_expositions(own: bytes, others: Iterable[bytes]) -> bytes:
    """One node's metrics from its processes' expositions (``server.workers``): ``own`` is the
    primary's. Samples with the same name and labels are added up (counters, histogram buckets,
    sums and counts, and gauges such as held locks, which are per process); the process and
    Python runtime families are the primary's alone."""
    families: dict[str, Metric] = {}
    merged: dict[str, dict[tuple[str, frozenset[tuple[str, str]]], Sample]] = {}
    for index, text in enumerate([own, *others]):
        for family in text_string_to_metric_families(text.decode()):
            if index and family.name.startswith(_PER_PROCESS):
                continue
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type)
            samples = merged.setdefault(family.name, {})
            for sample in family.samples:
                key = (sample.name, frozenset(sample.labels.items()))
                seen = samples.get(key)
                if seen is None:
                    samples[key] = sample
                else:
                    samples[key] = seen._replace(value=seen.value + sample.value)
    for name, family in families.items():
        family.samples = list(merged[name].values())
    return generate_latest(_Families(list(families.values())))
