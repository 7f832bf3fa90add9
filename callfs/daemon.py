"""The composition root: the only module that names concrete classes and their start/stop order.

``Node`` builds one node from a validated ``Config``: metadata store, lock manager, storage
backends, the engine, and the aiohttp listeners. ``run`` serves until SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import shutil
import signal
import socket
import ssl
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

from aiohttp import web

from callfs.api import erasure as erasure_api
from callfs.api import internal_fsck, internal_nodes, internal_raft
from callfs.api import uploads as uploads_api
from callfs.api.app import build_app
from callfs.api.health import metrics_handler
from callfs.api.limits import ConnectionCaps, ConnectionGuard, GuardedAppRunner
from callfs.api.relay import WAKE_PATH, PrimaryRelay
from callfs.api.state import STATE, ApiState, bridge_of
from callfs.auth.keys import Authenticator
from callfs.cluster import metrics as raft_metrics
from callfs.cluster.raft import RaftNode, RaftSettings
from callfs.cluster.service import RaftService, raft_password
from callfs.concurrency import shutdown_pools
from callfs.config import Config, ServerConfig
from callfs.core.background import Periodic, one_node_at_a_time
from callfs.core.engine import ORPHAN_GRACE, Engine, EngineSettings
from callfs.core.fsck import Fsck
from callfs.core.maintenance import FIRST_PASS, ErasureMaintenance
from callfs.core.peer import PeerClient
from callfs.core.placement_ops import NodeMoves
from callfs.core.replication import WorkQueueWorker
from callfs.core.uploads import SWEEP_INTERVAL as UPLOAD_SWEEP_INTERVAL
from callfs.core.uploads import UploadService
from callfs.erasure.service import ErasureService
from callfs.erasure.shards import ShardIO
from callfs.errors import CallFSError, ConfigError
from callfs.jobs.base import WorkQueue
from callfs.links.service import SWEEP_INTERVAL, LinkService
from callfs.locks.base import LockManager
from callfs.locks.instrumented import InstrumentedLockManager
from callfs.metadata.base import MetadataStore
from callfs.metadata.guarded import GuardedMetadataStore
from callfs.metadata.raft import RaftMetadataStore
from callfs.metrics import Metrics
from callfs.storage.base import StorageBackend
from callfs.storage.instrumented import InstrumentedBackend
from callfs.tls import client_context, server_context
from callfs.workers import (
    ALIVE_PATH,
    WorkerPool,
    WorkerSpec,
    listen_sockets,
    primary_socket,
    private_directory,
    signal_ready,
    watch_primary,
)

if TYPE_CHECKING:
    from callfs.api.http3 import Http3Server

log = logging.getLogger(__name__)

#: The longest request line served: a path of 4,096 bytes (§6.1), each byte percent-encoded
#: (3 characters), plus method, route prefix and query. aiohttp's 8,190 refused paths well
#: under the limit as 400 "malformed request" (found by audit: a PATCH could create an item no
#: GET or DELETE could name again).
MAX_REQUEST_LINE = 3 * 4096 + 4096

#: SIGTERM/SIGINT stop every listener within this many seconds (§2).
SHUTDOWN_TIMEOUT = 30.0
#: What aiohttp's own shutdown then waits for a request ``Node._drain`` left (it drops incoming
#: bytes meanwhile, so only a response still being written can finish in it).
DRAIN_GRACE = 1.0
KEEPALIVE_TIMEOUT = 120.0
#: How often a node looks for unreferenced blobs of its own backends (docs/storage-layout.md).
ORPHAN_SWEEP_INTERVAL = 600.0


def split_listen_addr(addr: str) -> tuple[str | None, int]:
    """``:8443`` -> (None, 8443) (all interfaces); ``127.0.0.1:8443``; ``[::1]:8443``."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"invalid listen address {addr!r}: expected host:port")
    host = host.strip("[]")
    return (host or None), int(port)


def make_metadata_store(cfg: Config) -> MetadataStore:
    ms = cfg.metadata_store
    if ms.type == "sqlite":
        from callfs.metadata.sqlite import SqliteMetadataStore

        return SqliteMetadataStore(ms.sqlite_path)
    if ms.type == "postgres":
        try:
            from callfs.metadata.postgres import PostgresMetadataStore
        except ModuleNotFoundError as exc:
            if exc.name != "asyncpg":
                raise
            raise ConfigError(
                "metadata_store.type=postgres needs the asyncpg driver, which is not installed: "
                "pip install 'callfs[postgres]'"
            ) from exc

        return PostgresMetadataStore(ms.dsn, op_timeout=cfg.server.metadata_op_timeout)
    if ms.type == "redis":
        try:
            from callfs.metadata.redis import RedisMetadataStore
        except ModuleNotFoundError as exc:
            if exc.name is None or exc.name.split(".")[0] != "redis":
                raise
            raise ConfigError(
                "metadata_store.type=redis needs the redis driver, which is not installed: "
                "pip install 'callfs[redis]'"
            ) from exc

        return RedisMetadataStore(
            ms.redis_addr,
            password=ms.redis_password,
            db=ms.redis_db,
            key_prefix=ms.redis_key_prefix,
            op_timeout=cfg.server.metadata_op_timeout,
        )
    raise ConfigError(f"metadata_store.type {ms.type!r} is not available in this version")


def make_raft_service(cfg: Config, peers: PeerClient) -> RaftService:
    """The node's Raft replica (API.md §12.5). The transport password is derived from
    ``auth.internal_proxy_secret``, which validation already requires to be set and secret."""
    r = cfg.raft
    me = r.bind_addr
    others = tuple(
        sorted({addr for node_id, addr in r.peers.items() if node_id != r.node_id and addr != me})
    )
    if not others and not r.bootstrap:
        raise ConfigError(
            "raft.peers is empty and raft.bootstrap is false: a node that does not bootstrap "
            "must list the current members in raft.peers (then run callfs cluster join)"
        )
    if cfg.instance_discovery.instance_id != r.node_id:
        log.warning(
            "instance_discovery.instance_id (%s) differs from raft.node_id (%s): other nodes "
            "find this node's files by instance ID, so keep them equal in a Raft cluster",
            cfg.instance_discovery.instance_id,
            r.node_id,
        )
    node = RaftNode(
        RaftSettings(
            node_id=r.node_id,
            bind_addr=me,
            peers=others,
            data_dir=r.data_dir,
            password=raft_password(cfg.auth.internal_proxy_secret),
            snapshot_interval=r.snapshot_interval,
            snapshot_threshold=r.snapshot_threshold,
            retain_snapshots=r.retain_snapshot_count,
        )
    )
    return RaftService(
        node,
        api_endpoint=cfg.server.external_url,
        peer_addrs=r.peers,
        peer_endpoints={**cfg.instance_discovery.peer_endpoints, **r.api_peer_endpoints},
        apply_timeout=r.apply_timeout,
        forward_timeout=r.forward_timeout,
        internal_secret=cfg.auth.internal_proxy_secret,
        session=lambda: peers.session,
    )


def make_work_queue(store: MetadataStore) -> WorkQueue:
    """The WorkQueue lives in the same database as the namespace (its own tables or keys)."""
    if isinstance(store, RaftMetadataStore):
        from callfs.jobs.raft import RaftWorkQueue

        return RaftWorkQueue(store.service)
    # Dispatch on the store's module so that a node never imports a driver it does not use.
    module = type(store).__module__
    if module == "callfs.metadata.sqlite":
        from callfs.jobs.sqlite import SqliteWorkQueue
        from callfs.metadata.sqlite import SqliteMetadataStore

        assert isinstance(store, SqliteMetadataStore)
        return SqliteWorkQueue(store)
    if module == "callfs.metadata.postgres":
        from callfs.jobs.postgres import PostgresWorkQueue
        from callfs.metadata.postgres import PostgresMetadataStore

        assert isinstance(store, PostgresMetadataStore)
        return PostgresWorkQueue(store)
    if module == "callfs.metadata.redis":
        from callfs.jobs.redis import RedisWorkQueue
        from callfs.metadata.redis import RedisMetadataStore

        assert isinstance(store, RedisMetadataStore)
        return RedisWorkQueue(store)
    raise ConfigError(f"no work queue for a {type(store).__name__}")


def make_lock_manager(cfg: Config) -> LockManager:
    if cfg.dlm.type == "local":
        from callfs.locks.local import LocalLockManager

        return LocalLockManager()
    try:
        from callfs.locks.redis import RedisLockManager
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] != "redis":
            raise
        raise ConfigError(
            "dlm.type=redis needs the redis driver, which is not installed: "
            "pip install 'callfs[redis]' (or dlm.type: local for a single node)"
        ) from exc

    return RedisLockManager(
        cfg.dlm.redis_addr,
        password=cfg.dlm.redis_password,
        db=cfg.dlm.redis_db,
        key_prefix=cfg.dlm.redis_key_prefix,
        # one lock call is bounded like a metadata call (it was 5 s whatever the config said)
        op_timeout=cfg.server.metadata_op_timeout,
    )


def make_backends(cfg: Config) -> dict[str, StorageBackend]:
    backends: dict[str, StorageBackend] = {}
    b = cfg.backend
    if b.localfs_root_path:
        from callfs.storage.localfs import LocalFSBackend

        backends["localfs"] = LocalFSBackend(b.localfs_root_path)
    if b.s3_bucket_name:
        from callfs.storage.s3 import S3Backend

        backends["s3"] = S3Backend(
            bucket=b.s3_bucket_name,
            region=b.s3_region,
            endpoint=b.s3_endpoint,
            access_key=b.s3_access_key,
            secret_key=b.s3_secret_key,
            sse=b.s3_server_side_encryption,
            kms_key_id=b.s3_kms_key_id,
            acl=b.s3_acl,
        )
    return backends


def shard_backend(cfg: Config, backends: dict[str, StorageBackend]) -> StorageBackend | None:
    """Where this node keeps its erasure shards (§11.2): the S3 bucket with
    ``erasure.shard_backend: s3``, else the localfs root. None when erasure is off."""
    if not cfg.erasure.enabled:
        return None
    kind = "s3" if cfg.erasure.shard_backend == "s3" else "localfs"
    found = backends.get(kind)
    if found is None:
        raise ConfigError(
            f"erasure.enabled needs a {kind} backend for shards "
            f"({'backend.s3_bucket_name' if kind == 's3' else 'backend.localfs_root_path'})"
        )
    return found


def uses_tls(cfg: Config) -> bool:
    s = cfg.server
    if s.protocol == "http":
        return False
    if s.protocol == "auto":
        return bool(s.cert_file and s.key_file)
    return True


def url_host(host: str) -> str:
    """``::1`` -> ``[::1]``: an IPv6 literal in a URL needs brackets."""
    return f"[{host}]" if ":" in host else host


#: The schema default of ``server.external_url``. The loader does not record which keys were
#: given, so this exact value (or "") means "not set" and the URL is derived from the listener.
UNSET_EXTERNAL_URLS = frozenset({"", ServerConfig().external_url})
_WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", "*"})


def derived_external_url(cfg: Config, hostname: Callable[[], str] = socket.gethostname) -> str:
    """The base URL this node is reached by, from ``server.listen_addr`` and the protocol:
    ``http``/``https`` as served, the listen port, and the listen host if it is a specific
    address; for all interfaces (``:8443``, ``0.0.0.0``, ``::``) the machine's host name
    (``127.0.0.1`` if it has none)."""
    host, port = split_listen_addr(cfg.server.listen_addr)
    if host is None or host in _WILDCARD_HOSTS:
        host = hostname().strip() or "127.0.0.1"
    scheme = "https" if uses_tls(cfg) else "http"
    return f"{scheme}://{url_host(host)}:{port}"


def resolve_external_url(cfg: Config, *, warn: bool = True) -> Config:
    """``cfg`` with ``server.external_url`` derived (``derived_external_url``) when it is not
    set; ``warn`` logs that the URL was guessed."""
    if cfg.server.external_url.strip() not in UNSET_EXTERNAL_URLS:
        return cfg
    url = derived_external_url(cfg)
    if warn:
        log.warning(
            "server.external_url is not set; using %s (derived from server.listen_addr and "
            "server.protocol) in link URLs and as this node's endpoint. Set server.external_url "
            "to the URL clients use to reach this node.",
            url,
        )
    return replace(cfg, server=replace(cfg.server, external_url=url))


def alt_svc(cfg: Config) -> str | None:
    if not cfg.server.enable_quic:
        return None
    _, port = split_listen_addr(cfg.server.quic_listen_addr)
    return f'h3=":{port}"; ma=3600'


def make_ssl_context(cfg: Config) -> ssl.SSLContext:
    return server_context(cfg.server.cert_file, cfg.server.key_file)


def peer_ssl_context(cfg: Config) -> ssl.SSLContext:
    """How this node verifies other nodes' certificates
    (``backend.internal_proxy_skip_tls_verify``)."""
    return client_context(
        cfg.backend.internal_proxy_skip_tls_verify, cfg.backend.internal_proxy_ca_file
    )


def log_listening(scheme: str, runner: web.AppRunner, what: str) -> None:
    """One line per bound TCP socket, e.g. ``listening on https://0.0.0.0:8443``."""
    for addr in runner.addresses:
        if isinstance(addr, tuple) and len(addr) >= 2:
            log.info("listening on %s://%s:%d%s", scheme, url_host(str(addr[0])), addr[1], what)


class Lifecycle(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...


@dataclass
class Node:
    """One running CallFS node. ``start`` brings it up in dependency order; ``stop`` reverses it."""

    cfg: Config
    metrics: Metrics = field(default_factory=Metrics)
    meta: MetadataStore | None = None
    locks: LockManager | None = None
    backends: dict[str, StorageBackend] = field(default_factory=dict)
    engine: Engine | None = None
    app: web.Application | None = None
    peers: PeerClient | None = None
    queue: WorkQueue | None = None
    links: LinkService | None = None
    raft: RaftService | None = None
    shard_backend: StorageBackend | None = None
    maintenance: ErasureMaintenance | None = None
    fsck: Fsck | None = None
    uploads: UploadService | None = None
    #: Set in a worker process of a node with ``server.workers`` > 1 (``callfs.workers``).
    worker: WorkerSpec | None = None
    #: A worker's relay to its primary; a primary's worker processes.
    relay: PrimaryRelay | None = None
    pool: WorkerPool | None = None
    _runners: list[web.AppRunner] = field(default_factory=list)
    #: A worker's private listener (its metrics and the primary's probe): served to the end of
    #: a drain, or the probe would take the draining worker for a hung one
    _private: web.AppRunner | None = None
    _started: list[Lifecycle] = field(default_factory=list)
    _http3: Http3Server | None = None
    _bridge_dir: str | None = None
    _workers_dir: str | None = None

    def build(self) -> web.Application:
        """Construct every component (no I/O) and return the main application."""
        cfg = self.cfg
        self.peers = PeerClient(
            {
                **cfg.instance_discovery.peer_endpoints,
                cfg.instance_discovery.instance_id: cfg.server.external_url,
            },
            cfg.auth.internal_proxy_secret,
            ssl_context=peer_ssl_context(cfg),
        )
        if cfg.metadata_store.type == "raft":
            self.raft = make_raft_service(cfg, self.peers)
            raft_metrics.register(self.raft, self.metrics.registry)
            inner: MetadataStore = RaftMetadataStore(self.raft)
        else:
            inner = make_metadata_store(cfg)
        self.meta = GuardedMetadataStore(inner, cfg.server.metadata_op_timeout, self.metrics)
        self.queue = make_work_queue(inner)
        self.locks = InstrumentedLockManager(make_lock_manager(cfg), self.metrics)
        self.backends = {
            kind: InstrumentedBackend(backend, self.metrics)
            for kind, backend in make_backends(cfg).items()
        }
        settings = EngineSettings(
            instance_id=cfg.instance_discovery.instance_id,
            default_backend=cfg.backend.default_backend,
            lock_timeout=cfg.dlm.lock_timeout,
            file_op_timeout=cfg.server.file_op_timeout,
            known_instances=frozenset(cfg.instance_discovery.peer_endpoints),
            replica_backend=cfg.ha.replica_backend if cfg.ha.replication_enabled else None,
            require_replica_success=cfg.ha.require_replica_success,
            erasure_enabled=cfg.erasure.enabled,
            erasure_data_shards=cfg.erasure.data_shards if cfg.erasure.data_shards >= 2 else 4,
            erasure_parity_shards=(
                cfg.erasure.parity_shards if cfg.erasure.parity_shards >= 1 else 2
            ),
        )
        self.shard_backend = shard_backend(cfg, self.backends)
        # Every node reads and deletes the erasure-coded files of the cluster (§11.4 "every node
        # can read the file"); erasure.enabled decides whether this node writes shards (new
        # files, a PUT's re-encoding), serves them and runs the repair pass.
        shards_kind = "s3" if cfg.erasure.shard_backend == "s3" else "localfs"
        readers_backend = self.shard_backend or self.backends.get(shards_kind)
        erasure = None
        if readers_backend is not None:
            erasure = ErasureService(
                cfg.instance_discovery.instance_id,
                ShardIO(cfg.instance_discovery.instance_id, readers_backend, self.peers),
            )
        self.engine = Engine(
            self.meta,
            self.locks,
            self.backends,
            settings,
            peers=self.peers,
            metrics=self.metrics,
            queue=self.queue,
            erasure=erasure,
        )
        if erasure is not None and self.shard_backend is not None:
            peers = self.peers

            def peer_ids() -> list[str]:
                return sorted(
                    set(peers.endpoints) | set(self.raft.endpoints() if self.raft else ())
                )

            self.maintenance = ErasureMaintenance(
                self.meta,
                erasure,
                peers,
                peer_ids,
                self.metrics,
            )
        nodes, cluster = self.peers, self.raft
        self.fsck = Fsck(
            self.engine, self.meta, self.backends, self.shard_backend, nodes,
            lambda: [*nodes.endpoints, *(cluster.endpoints() if cluster else ())], self.queue,
            metrics=self.metrics,
        )  # fmt: skip
        self.links = LinkService(self.meta, cfg.auth.single_use_link_secret, self.metrics)
        state = ApiState(
            engine=self.engine,
            auth=Authenticator(
                cfg.auth.api_keys, cfg.auth.api_key_users, cfg.auth.internal_proxy_secret
            ),
            max_upload_size=cfg.server.max_upload_size,
            instance_id=cfg.instance_discovery.instance_id,
            external_url=cfg.server.external_url,
            metrics=self.metrics,
            links=self.links,
            peers=self.peers,
            alt_svc=alt_svc(cfg),
            read_timeout=cfg.server.read_timeout,
            write_timeout=cfg.server.write_timeout,
        )
        if self.worker is not None:
            self.relay = PrimaryRelay(self.worker.primary_socket, cfg.server.max_connections)
            self.app = build_app(state, relay=self.relay.middleware)
            self.engine.on_work_queued = self.relay.wake  # the primary runs the queue worker
        else:
            self.app = build_app(state)
            if cfg.server.workers > 1:
                self.app.router.add_post(WAKE_PATH, self._wake)
        if self.raft is not None:
            internal_raft.add_routes(self.app, self.raft)
        if self.shard_backend is not None:
            erasure_api.add_routes(self.app, self.shard_backend, self.maintenance)
        internal_fsck.add_routes(self.app, self.fsck)
        peers, raft = self.peers, self.raft

        def members() -> list[str]:  # configured peers and Raft members: drain/rebalance targets
            return [*peers.endpoints, *(raft.endpoints() if raft is not None else ())]

        moves = NodeMoves(self.engine, self.meta, peers, members, self.locks, self.metrics)
        internal_nodes.add_routes(self.app, moves, raft)
        if cfg.backend.localfs_root_path:  # resumable uploads stage on this node's disk
            staging = os.path.join(cfg.backend.localfs_root_path, ".callfs", "uploads")
            self.uploads = UploadService(self.engine, staging, cfg.server.max_upload_size)
            uploads_api.add_routes(self.app, self.uploads)
        return self.app

    async def _wake(self, request: web.Request) -> web.StreamResponse:
        """A worker process queued work: the queue worker looks now, not at its next poll."""
        assert self.engine is not None and self.app is not None
        if bridge_of(self.app[STATE], request) != "worker":
            raise web.HTTPNotFound()
        if self.engine.on_work_queued is not None:
            self.engine.on_work_queued()
        return web.Response(status=204)

    async def start_components(self) -> None:
        """Start stores and backends (what the aiohttp test client needs before requests)."""
        if self.app is None:
            self.build()
        assert self.meta is not None and self.locks is not None
        assert self.peers is not None
        if self.relay is not None:  # a worker process: requests only; the primary does the rest
            assert self.queue is not None
            parts: list[Lifecycle] = [self.peers, self.meta, self.queue, self.locks]
            for part in [*parts, *self.backends.values(), self.relay]:
                await part.start()
                self._started.append(part)
            return
        assert self.engine is not None and self.links is not None and self.queue is not None
        engine, fsck = self.engine, self.fsck
        assert fsck is not None
        coordinator = self.raft.node.is_leader if self.raft is not None else None
        components: list[Lifecycle] = [
            self.peers,  # first: a Raft follower forwards through it from its first command
            self.meta,
            self.queue,
            self.locks,
            *self.backends.values(),
            # Background work belongs to the node, not to the HTTP app.
            WorkQueueWorker(
                engine, self.queue, self.cfg.instance_discovery.instance_id, self.metrics
            ),
            # Chores over the shared metadata run on one node at a time; the orphan sweep is each
            # node's own disk, so every node runs it.
            Periodic(
                "link-sweep",
                SWEEP_INTERVAL,
                one_node_at_a_time("link-sweep", self.links.sweep, self.locks, coordinator),
            ),
            Periodic(
                "orphan-sweep",
                ORPHAN_SWEEP_INTERVAL,
                lambda: fsck.sweep(ORPHAN_GRACE),  # blobs, replica copies, shards, temp files
                first_delay=60.0,
            ),
            Periodic("stored-count", math.inf, fsck.count_stored),  # once, at start; then the sweep
        ]
        if self.uploads is not None:  # after the backends: a sweep may commit a finished upload
            components.append(self.uploads)
            components.append(
                Periodic(
                    "upload-sweep", UPLOAD_SWEEP_INTERVAL, self.uploads.sweep, first_delay=30.0
                )
            )
        interval = self.cfg.erasure.repair_interval
        if self.maintenance is not None and interval > 0:
            components.append(
                Periodic(
                    "erasure-repair",
                    interval,
                    one_node_at_a_time(
                        "erasure-repair", self.maintenance.automatic_pass, self.locks, coordinator
                    ),
                    first_delay=min(FIRST_PASS, interval),
                )
            )
        if self.raft is not None:
            raft, peers = self.raft, self.peers
            # Endpoints of Raft members come from the replicated member table, read when needed.
            components.append(Periodic("raft-register", 3600.0, raft.register))

            peers.resolver = lambda node_id: raft.endpoints().get(node_id)
        for component in components:
            await component.start()
            self._started.append(component)

    async def start(self) -> None:
        await self.start_components()
        assert self.app is not None
        cfg = self.cfg
        ssl_ctx = make_ssl_context(cfg) if uses_tls(cfg) else None
        if cfg.server.enable_quic and ssl_ctx is None:
            # HTTP/3's TLS over plain HTTP: the same checks before anything is bound (aioquic
            # loads a key that does not match the certificate, and every handshake then fails)
            make_ssl_context(cfg)
        # One guard for every TCP listener: the caps protect the process's file descriptors.
        guard = ConnectionGuard(
            ConnectionCaps(cfg.server.max_connections, cfg.server.max_connections_per_ip),
            cfg.server.read_timeout,
            self.metrics,
        )
        main = GuardedAppRunner(
            self.app,
            guard,
            access_log=None,
            keepalive_timeout=KEEPALIVE_TIMEOUT,
            shutdown_timeout=DRAIN_GRACE,  # after ``Node._drain``
            max_line_size=MAX_REQUEST_LINE,
        )
        await main.setup()
        self._runners.append(main)
        host, port = split_listen_addr(cfg.server.listen_addr)
        shared = cfg.server.workers > 1
        if self.worker is not None:
            for sock in listen_sockets(host, self.worker.port, check_free=False):
                await web.SockSite(main, sock, ssl_context=ssl_ctx).start()
            await self._start_worker_metrics()
            return
        if shared:
            # Bound (and checked free) now; accepted from once the workers serve too.
            socks = listen_sockets(host, port, check_free=True)
            try:
                await self._start_relay_socket(main)
                assert self._workers_dir is not None
                bound = int(socks[0].getsockname()[1])
                # A worker's grace covers its own 30 s drain and closing its stores after it.
                grace = SHUTDOWN_TIMEOUT + 10
                self.pool = WorkerPool(cfg, self._workers_dir, bound, grace, self.metrics)
                self.metrics.gather = self.pool.exposition
                await self.pool.start()
                while socks:
                    await web.SockSite(main, socks[0], ssl_context=ssl_ctx).start()
                    socks.pop(0)  # the site owns it now
            finally:
                for sock in socks:  # not handed to a site: start-up failed
                    sock.close()
        else:
            await web.TCPSite(main, host, port, ssl_context=ssl_ctx).start()
        log_listening("https" if ssl_ctx else "http", main, "")
        if cfg.server.enable_quic:
            await self._start_http3(main)
        if cfg.metrics.listen_addr:
            metrics_app = web.Application()
            metrics_app.router.add_get("/metrics", metrics_handler(self.metrics), allow_head=False)
            runner = GuardedAppRunner(metrics_app, guard, access_log=None)
            await runner.setup()
            self._runners.append(runner)
            mhost, mport = split_listen_addr(cfg.metrics.listen_addr)
            await web.TCPSite(runner, mhost, mport).start()
            log_listening("http", runner, " (metrics, GET /metrics only, no authentication)")

    async def _start_relay_socket(self, main: web.AppRunner) -> None:
        """The private socket worker processes relay to, in a private directory."""
        self._workers_dir = private_directory()
        path = primary_socket(self._workers_dir)
        await web.UnixSite(main, path).start()
        os.chmod(path, 0o600)
        assert self.app is not None
        self.app[STATE].worker_socket = path

    async def _start_worker_metrics(self) -> None:
        """A worker's own metrics, for its primary's ``/metrics`` (``WorkerPool.exposition``)."""
        assert self.worker is not None
        app = web.Application()
        app.router.add_get("/metrics", metrics_handler(self.metrics), allow_head=False)
        app.router.add_get(ALIVE_PATH, _alive, allow_head=False)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        self._runners.append(runner)
        self._private = runner
        await web.UnixSite(runner, self.worker.metrics_socket).start()
        os.chmod(self.worker.metrics_socket, 0o600)

    async def _start_http3(self, main: web.AppRunner) -> None:
        """HTTP/3 relays to the same app over a private unix socket (see ``api/http3.py``)."""
        from callfs.api.http3 import Http3Server

        cfg = self.cfg
        self._bridge_dir = tempfile.mkdtemp(prefix="callfs-h3-")
        socket_path = os.path.join(self._bridge_dir, "bridge.sock")
        await web.UnixSite(main, socket_path).start()
        os.chmod(socket_path, 0o600)
        assert self.app is not None
        self.app[STATE].h3_socket = socket_path
        qhost, qport = split_listen_addr(cfg.server.quic_listen_addr)
        self._http3 = Http3Server(
            qhost or "::", qport, cfg.server.cert_file, cfg.server.key_file, socket_path
        )
        await self._http3.start()
        log.info(
            "listening on https://%s:%d (HTTP/3 over QUIC, UDP)", url_host(qhost or "::"), qport
        )

    async def _drain(self) -> None:
        """Stop every listener, then wait (``SHUTDOWN_TIMEOUT`` at most) for the requests in
        progress. aiohttp's own shutdown drops every byte that arrives once it begins, so an
        upload whose body was still arriving failed with 'timed out reading the request body'
        after 30 s, its bytes sent in time (found by review); here its connection still reads.
        ``runner.cleanup`` then cancels what is left, after ``DRAIN_GRACE``."""
        for runner in self._runners:
            for site in list(runner.sites if runner is not self._private else ()):
                await site.stop()
        if self.app is not None and self.app.frozen and self._runners:
            # its shutdown hooks first: they end the long-lived connections (the Raft channels
            # of the followers) that are no work to wait for (they run again in cleanup: no-ops)
            await self.app.shutdown()
        state = self.app[STATE] if self.app is not None else None
        deadline = asyncio.get_running_loop().time() + SHUTDOWN_TIMEOUT
        while state is not None and state.active > 0:
            if asyncio.get_running_loop().time() >= deadline:
                log.warning("%d requests still in progress at shutdown: cancelled", state.active)
                break
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self.app is not None:
            self.app[STATE].draining = True  # new requests refused (not a worker's relayed ones)
        if self.pool is not None:
            # Stop taking connections at once, then let the workers finish theirs (they may
            # still relay to this process's private socket) while this process finishes its own.
            for site in list(self._runners[0].sites if self._runners else ()):
                if isinstance(site, web.SockSite):
                    await site.stop()
            await self.pool.close()
            self.pool = None
        if self._http3 is not None:
            await self._http3.stop()
            self._http3 = None
        await self._drain()
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        for component in reversed(self._started):
            try:
                await component.close()
            except Exception:
                log.warning("error while closing %s", type(component).__name__, exc_info=True)
        self._started.clear()
        for attr in ("_bridge_dir", "_workers_dir"):
            directory = getattr(self, attr)
            if directory is not None:
                shutil.rmtree(directory, ignore_errors=True)
                setattr(self, attr, None)


async def _alive(request: web.Request) -> web.Response:
    """A worker's event loop answers its primary's probe (``WorkerPool._probe``)."""
    return web.Response(status=204)


def _hangup() -> None:
    """SIGHUP (a closed terminal, or an operator expecting a reload) no longer kills the node
    without draining (the default action): the configuration is read only at start."""
    log.warning(
        "SIGHUP ignored: the configuration is not reloaded; restart the node to apply changes"
        " (SIGTERM stops it gracefully)"
    )


async def serve(
    cfg: Config, on_ready: Callable[[], None] | None = None, worker: WorkerSpec | None = None
) -> None:
    node = Node(cfg, worker=worker) if worker is not None else Node(resolve_external_url(cfg))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # A worker leaves SIGINT (Ctrl-C reaches the whole process group) to its primary, which
    # stops it with SIGTERM or by closing its pipe.
    for sig in (signal.SIGTERM,) if worker is not None else (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if worker is None:  # a worker ignores it from its first line (``callfs/worker.py``)
        loop.add_signal_handler(signal.SIGHUP, _hangup)
    if worker is not None:
        watch_primary(loop, stop)
    try:
        await node.start()
        if on_ready is not None:
            on_ready()
        await stop.wait()
        log.info("shutting down")
    finally:
        if worker is not None:
            _exit_later(SHUTDOWN_TIMEOUT + 20)
        await node.stop()


def _exit_later(deadline: float) -> None:
    """A stopping worker is gone within its drain time plus a margin, whatever hangs (SIGINT is
    ignored, and its primary may be dead and unable to SIGKILL it)."""
    timer = threading.Timer(deadline, os._exit, args=(1,))
    timer.daemon = True
    timer.start()


def log_secrets(cfg: Config) -> list[str]:
    """Every configured secret the log redaction filter must hide (``run`` passes these on)."""
    auth = cfg.auth
    return [
        *auth.api_keys,
        *auth.api_key_users.values(),
        auth.internal_proxy_secret,
        auth.single_use_link_secret,
        cfg.backend.s3_secret_key,
        # not secret to AWS, but it names the account: botocore's debug lines quoted it
        cfg.backend.s3_access_key,
        cfg.metadata_store.redis_password,
        cfg.dlm.redis_password,
    ]


def run(
    cfg: Config, on_ready: Callable[[], None] | None = None, worker: WorkerSpec | None = None
) -> int:
    """Serve until SIGINT/SIGTERM; the process exit code (1 when start-up fails)."""
    from callfs.log import configure_logging

    configure_logging(cfg.log.level, cfg.log.format, secrets=log_secrets(cfg))
    try:
        asyncio.run(serve(cfg, on_ready, worker))
    except (CallFSError, OSError) as exc:
        message = exc.message if isinstance(exc, CallFSError) else str(exc)
        log.error("start-up failed: %s", message)
        import sys

        print(f"Error: {message}", file=sys.stderr, flush=True)
        return 1
    finally:
        shutdown_pools()
    return 0


def run_worker(spec: WorkerSpec) -> int:
    """A worker process of a primary (``python -m callfs.worker``, ``callfs.workers``)."""
    from callfs.log import set_worker

    set_worker(spec.index)  # every log line of this process names it
    return run(spec.cfg, on_ready=signal_ready, worker=spec)
