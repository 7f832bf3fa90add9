"""Validation (API.md §19): sections in the contract's order. Pure: no files, no network.

``problems`` lists every failure at once: first the contract's checks in the contract's order (so
the first message is the one §19 says wins), then our additions, each naming its key and the fix.
The caller prefixes the first with ``config validation failed: ``; ``validate`` returns only it."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

from callfs.config.schema import AuthConfig, Config

DEFAULT_API_KEY = "default-api-key"
DEFAULT_INTERNAL_SECRET = "change-me-internal-secret"  # noqa: S105 - the refused placeholder
DEFAULT_LINK_SECRET = "change-me-link-secret"  # noqa: S105 - the refused placeholder
MIN_KEY_LENGTH = 16
_RESERVED_USER = re.compile(r"api-user-\d+")


def validate(cfg: Config) -> str | None:
    """The contract's first failure (API.md §19), or None."""
    found = problems(cfg)
    return found[0] if found else None


def problems(cfg: Config) -> list[str]:
    """Every failure at once: the contract's checks in its order (so the first is the one §19
    names), then our additions (ports, DSN scheme, backends, Redis prefixes), each naming its key
    and the fix."""
    out: list[str] = []
    for check in (
        _server,
        _metadata_store,
        _dlm,
        _ha,
        _instance,
        lambda c: _auth(c.auth),
        _erasure,
        _default_backend,
        *EXTRA_CHECKS,
    ):
        out.extend(check(cfg))
    return out


#: ``server.workers``: processes that serve one node's main port (docs/workers.md).
MAX_WORKERS = 64


def _server(cfg: Config) -> Iterator[str]:
    s = cfg.server
    if not s.listen_addr:
        yield "server.listen_addr is required"
    if s.protocol not in ("http", "https", "auto"):
        yield "server.protocol must be one of: http, https, auto"
    if s.protocol == "https" and not (s.cert_file and s.key_file):
        yield "server.cert_file and server.key_file are required when server.protocol=https"
    elif s.enable_quic and not (s.cert_file and s.key_file):
        yield "server.cert_file and server.key_file are required when server.enable_quic=true"
    if s.enable_quic and not s.quic_listen_addr:
        yield "server.quic_listen_addr is required when server.enable_quic=true"
    if s.max_upload_size <= 0:
        yield "server.max_upload_size must be > 0"


def _server_more(cfg: Config) -> Iterator[str]:
    """Ours, after every contract check (a config audit: ``server.workers: 0`` had come before
    the contract's first message)."""
    s = cfg.server
    for name in ("max_connections", "max_connections_per_ip"):
        if getattr(s, name) <= 0:
            yield f"server.{name} must be > 0"
    for name in ("file_op_timeout", "metadata_op_timeout"):
        if getattr(s, name) <= 0:  # 0 had made every write time out at once (503)
            yield f"server.{name} must be > 0 (a duration such as 10s)"
    if not 1 <= s.workers <= MAX_WORKERS:
        yield f"server.workers must be between 1 and {MAX_WORKERS} (got {s.workers})"
    elif s.workers > 1 and cfg.metadata_store.type == "raft":
        yield (
            "server.workers must be 1 when metadata_store.type=raft: a Raft node keeps one "
            "state machine in one process (docs/workers.md)"
        )


def _metadata_store(cfg: Config) -> Iterator[str]:
    m = cfg.metadata_store
    if m.type == "postgres":
        if not m.dsn:
            yield "metadata_store.dsn is required when metadata_store.type=postgres"
        return
    if m.type == "sqlite":
        if not m.sqlite_path:
            yield "metadata_store.sqlite_path is required when metadata_store.type=sqlite"
        return
    if m.type == "redis":
        if not m.redis_addr:
            yield "metadata_store.redis_addr is required when metadata_store.type=redis"
        return
    if m.type != "raft":
        yield "metadata_store.type must be one of: postgres, sqlite, redis, raft"
        return
    r = cfg.raft
    for name in ("node_id", "bind_addr", "data_dir"):
        if not getattr(r, name):
            yield f"raft.{name} is required when metadata_store.type=raft"
    for name in (
        "apply_timeout",
        "forward_timeout",
        "snapshot_interval",
        "snapshot_threshold",
        "retain_snapshot_count",
    ):
        if getattr(r, name) <= 0:
            yield f"raft.{name} must be > 0 when metadata_store.type=raft"


def _dlm(cfg: Config) -> Iterator[str]:
    d = cfg.dlm
    if d.type == "redis" and not d.redis_addr:
        yield "dlm.redis_addr is required when dlm.type=redis"
    if d.type not in ("redis", "local"):
        yield "dlm.type must be one of: redis, local"
    if d.lock_timeout <= 0:
        yield "dlm.lock_timeout must be > 0"


def _ha(cfg: Config) -> Iterator[str]:
    if cfg.ha.replication_enabled and cfg.ha.replica_backend not in ("localfs", "s3"):
        yield "ha.replica_backend must be one of: localfs, s3 when ha.replication_enabled=true"


def _instance(cfg: Config) -> Iterator[str]:
    if not cfg.instance_discovery.instance_id:
        yield "instance_discovery.instance_id is required"


def _auth(a: AuthConfig) -> Iterator[str]:
    if not a.api_keys and not a.api_key_users:
        yield "auth.api_keys or auth.api_key_users must contain at least one key"
    seen: dict[str, str] = {}
    for i, k in enumerate(a.api_keys):
        if k == DEFAULT_API_KEY:
            yield f"auth.api_keys must not use default value '{DEFAULT_API_KEY}'"
        elif len(k) < MIN_KEY_LENGTH:
            yield "auth.api_keys: each key must be at least 16 characters"
        elif k in seen:
            yield f"auth.api_keys: key at index {i} is already configured for {seen[k]}"
        else:
            seen[k] = f"api_keys index {i}"
    for user in sorted(a.api_key_users):
        k = a.api_key_users[user]
        # API.md §19's order for each key: default value, length, then the user ID, then reuse
        if k == DEFAULT_API_KEY:
            yield f"auth.api_key_users must not use default value '{DEFAULT_API_KEY}'"
        elif len(k) < MIN_KEY_LENGTH:
            yield "auth.api_key_users: each key must be at least 16 characters"
        elif not user.strip():
            yield "auth.api_key_users: user ID must not be empty"
        elif user in ("root", "internal-proxy") or _RESERVED_USER.fullmatch(user):
            yield f'auth.api_key_users: user ID "{user}" is reserved'
        elif k in seen:
            yield f'auth.api_key_users: key for "{user}" is already configured for {seen[k]}'
        else:
            seen[k] = f'api_key_users "{user}"'
    if a.internal_proxy_secret in seen:
        yield "auth.internal_proxy_secret must not be reused as an API key"
    elif not a.internal_proxy_secret or a.internal_proxy_secret == DEFAULT_INTERNAL_SECRET:
        yield "auth.internal_proxy_secret must be set and not use default value"
    if not a.single_use_link_secret or a.single_use_link_secret == DEFAULT_LINK_SECRET:
        yield "auth.single_use_link_secret must be set and not use default value"


def _erasure(cfg: Config) -> Iterator[str]:
    if cfg.erasure.data_shards + cfg.erasure.parity_shards > 256:
        yield "erasure.data_shards + erasure.parity_shards must not exceed 256"


def _erasure_more(cfg: Config) -> Iterator[str]:
    if cfg.erasure.repair_interval < 0:
        yield "erasure.repair_interval must be >= 0 (0 disables the automatic repair pass)"


def _default_backend(cfg: Config) -> Iterator[str]:
    value = cfg.backend.default_backend
    if value not in ("localfs", "s3", ""):
        yield f'backend.default_backend must be one of: localfs, s3 (got "{value}")'


# ---- our additions (after the contract's checks, so they never change its first message) ------

#: Sub-namespace of ``metadata_store.redis_key_prefix`` that the Redis metadata store never writes
#: (its keys are ``P e:`` ``P c:`` ``P l:`` ``P x:`` ``P w:`` ``P L`` ``P B`` ``P W`` ``P wid``),
#: reserved for locks: the default lock prefix ``callfs:lock:`` (API.md §14) lives there.
LOCK_NAMESPACE = "lock:"


def _port_problem(dotted: str, addr: str, *, listen: bool) -> str | None:
    """A ``host:port`` value whose port is missing, not a number or out of range."""
    host, sep, port = addr.rpartition(":")
    example = '":8443" or "127.0.0.1:8443"' if listen else '"localhost:6379"'
    if not sep or (host and not host.endswith("]") and ":" in host):
        if listen or (sep and not port.isdigit()):
            return f'{dotted} "{addr}" must be host:port, e.g. {example}'
        return None  # a Redis address without a port means 6379
    if not port.isdigit():
        return f'{dotted} "{addr}": port "{port}" is not a number; use host:port, e.g. {example}'
    low = 0 if listen else 1
    if not low <= int(port) <= 65535:
        return f'{dotted} "{addr}": port {int(port)} is out of range {low}-65535'
    return None


def _addresses(cfg: Config) -> Iterator[str]:
    s = cfg.server
    addrs: list[tuple[str, str, bool]] = []
    if s.listen_addr:
        addrs.append(("server.listen_addr", s.listen_addr, True))
    if s.enable_quic and s.quic_listen_addr:
        addrs.append(("server.quic_listen_addr", s.quic_listen_addr, True))
    if cfg.metrics.listen_addr:
        addrs.append(("metrics.listen_addr", cfg.metrics.listen_addr, True))
    if cfg.metadata_store.type == "raft" and cfg.raft.bind_addr:
        addrs.append(("raft.bind_addr", cfg.raft.bind_addr, True))
    if cfg.metadata_store.type == "redis" and cfg.metadata_store.redis_addr:
        addrs.append(("metadata_store.redis_addr", cfg.metadata_store.redis_addr, False))
    if cfg.dlm.type == "redis" and cfg.dlm.redis_addr:
        addrs.append(("dlm.redis_addr", cfg.dlm.redis_addr, False))
    for dotted, addr, listen in addrs:
        problem = _port_problem(dotted, addr, listen=listen)
        if problem is not None:
            yield problem


def _dsn(cfg: Config) -> Iterator[str]:
    m = cfg.metadata_store
    if m.type != "postgres" or not m.dsn:
        return
    scheme = urlsplit(m.dsn).scheme if "://" in m.dsn else ""
    if scheme not in ("postgres", "postgresql"):
        got = f'scheme "{scheme}"' if scheme else "no scheme"
        yield (
            f"metadata_store.dsn must be a postgres:// or postgresql:// URL (got {got}), "
            "e.g. postgres://user:password@host:5432/dbname?sslmode=require"
        )


def cautions(cfg: Config) -> list[str]:
    """What the contract accepts but is likely a mistake: warnings, not failures."""
    return list(_backends(cfg))


def _backends(cfg: Config) -> Iterator[str]:
    """§2: an empty root or bucket disables that backend, and what needs it answers 500; a
    config audit found these refused, which the contract does not do."""
    b = cfg.backend
    if b.default_backend == "s3" and not b.s3_bucket_name:
        yield (
            "backend.default_backend is s3 but backend.s3_bucket_name is empty (S3 is disabled, "
            "so new files get 500); set backend.s3_bucket_name or use "
            "backend.default_backend: localfs"
        )
    if b.default_backend == "localfs" and not b.localfs_root_path:
        yield (
            "backend.default_backend is localfs but backend.localfs_root_path is empty (localfs "
            "is disabled, so new files get 500); set backend.localfs_root_path or use "
            "backend.default_backend: s3"
        )


def _same_redis(a: str, b: str) -> bool:
    def norm(addr: str) -> tuple[str, str]:
        host, sep, port = addr.strip().rpartition(":")
        if not sep:
            host, port = addr.strip(), ""
        host = host.strip("[]").lower() or "localhost"
        if host in ("127.0.0.1", "::1"):
            host = "localhost"
        return host, port or "6379"

    return norm(a) == norm(b)


def _redis_namespaces(cfg: Config) -> Iterator[str]:
    m, d = cfg.metadata_store, cfg.dlm
    if m.type == "redis" and m.redis_db < 0:
        yield f"metadata_store.redis_db must be >= 0 (got {m.redis_db})"
    if d.type == "redis" and d.redis_db < 0:
        yield f"dlm.redis_db must be >= 0 (got {d.redis_db})"
    if m.type != "redis" or d.type != "redis" or m.redis_db != d.redis_db:
        return
    if not _same_redis(m.redis_addr, d.redis_addr):
        return
    meta, locks = m.redis_key_prefix, d.redis_key_prefix
    disjoint = not meta.startswith(locks) and not locks.startswith(meta)
    if disjoint or locks.startswith(meta + LOCK_NAMESPACE):
        return
    yield (
        f'dlm.redis_key_prefix "{locks}" overlaps metadata_store.redis_key_prefix "{meta}" on '
        f"the same Redis database, so a lock key could equal a metadata key; use "
        f'dlm.redis_key_prefix: "{meta}{LOCK_NAMESPACE}", a prefix that neither starts nor '
        "is started by the metadata prefix, or another dlm.redis_db"
    )


def _replica_backend(cfg: Config) -> Iterator[str]:
    """Every write replicates: to a disabled backend each would commit, then answer 500. Refused
    by ``config validate`` and at start alike (``validate`` passed a config the server refused)."""
    h, b = cfg.ha, cfg.backend
    configured = {"localfs": bool(b.localfs_root_path), "s3": bool(b.s3_bucket_name)}
    if h.replication_enabled and configured.get(h.replica_backend) is False:
        yield (
            f"ha.replica_backend is {h.replica_backend!r}, but that backend is not configured"
            " (set backend.localfs_root_path or backend.s3_bucket_name)"
        )


EXTRA_CHECKS: tuple[Callable[[Config], Iterator[str]], ...] = (
    _server_more,
    _erasure_more,
    _addresses,
    _dsn,
    _redis_namespaces,
    _replica_backend,
)


# ---- what will run (``callfs config validate --summary``) -------------------------------------


def mask_url(url: str) -> str:
    """A store address with its password (userinfo or a ``password=`` parameter) as ``***``."""
    masked = re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)
    return re.sub(r"(?i)((?:^|[?&\s])password=)[^&\s]*", r"\1***", masked)


def summary(cfg: Config) -> list[str]:
    """One line per part that will run: store, backends, locks, protocol, listeners."""
    m, s, b, d = cfg.metadata_store, cfg.server, cfg.backend, cfg.dlm
    if m.type == "postgres":
        store = f"postgres at {mask_url(m.dsn)}"
    elif m.type == "sqlite":
        store = f"sqlite at {m.sqlite_path}"
    elif m.type == "redis":
        store = f'redis at {m.redis_addr} db {m.redis_db}, key prefix "{m.redis_key_prefix}"'
    else:
        r = cfg.raft
        store = (
            f"raft, node {r.node_id} at {r.bind_addr}, data in {r.data_dir}, "
            f"{len(r.peers)} peer(s) configured{', bootstraps' if r.bootstrap else ''}"
        )
    backends = []
    if b.localfs_root_path:
        backends.append(f"localfs at {b.localfs_root_path}")
    if b.s3_bucket_name:
        where = f", endpoint {b.s3_endpoint}" if b.s3_endpoint else ""
        backends.append(f"s3 bucket {b.s3_bucket_name} ({b.s3_region}{where})")
    shown = "; ".join(backends) or "none"
    if b.default_backend:
        shown += f"; new files go to {b.default_backend}"
    if d.type == "redis":
        locks = (
            f'redis at {d.redis_addr} db {d.redis_db}, key prefix "{d.redis_key_prefix}", '
            f"wait up to {d.lock_timeout:g}s"
        )
    else:
        locks = f"local (this process only: one node), wait up to {d.lock_timeout:g}s"
    tls = s.protocol == "https" or (s.protocol == "auto" and bool(s.cert_file and s.key_file))
    protocol = s.protocol + (f" (cert {s.cert_file}, key {s.key_file})" if tls else "")
    api = f"API {'https' if tls else 'http'} on {s.listen_addr}"
    if s.workers > 1:
        api += f" ({s.workers} processes)"
        if d.type != "redis":
            locks = (
                f"local (each of the {s.workers} processes its own; the store decides races), "
                f"wait up to {d.lock_timeout:g}s"
            )
    listeners = [api]
    if s.enable_quic:
        listeners.append(f"HTTP/3 (QUIC) on udp {s.quic_listen_addr}")
    if cfg.metrics.listen_addr:
        listeners.append(f"metrics on {cfg.metrics.listen_addr} (unauthenticated)")
    else:
        listeners.append("metrics only on the API port (authenticated)")
    if m.type == "raft":
        listeners.append(f"raft on {cfg.raft.bind_addr}")
    return [
        f"Metadata Store: {store}",
        f"Backends: {shown}",
        f"Locks: {locks}",
        f"Protocol: {protocol}",
        f"Listeners: {'; '.join(listeners)}",
    ]
