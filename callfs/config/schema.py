"""Every configuration key, declared once: type, default, kind and a one-line doc (API.md §19).

Durations are float seconds in the objects (``30s`` -> 30.0); maps are read-only mappings.
``docs/configuration.md`` and ``examples/config/full.yaml`` list the same keys (a test checks it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

DURATION = "duration"
SIZE = "size"


def key(default: Any, doc: str, kind: str = "") -> Any:
    """One key: its default and doc; ``kind`` refines the Python type (durations)."""
    if isinstance(default, dict):
        frozen = MappingProxyType(dict(default))
        return field(default_factory=lambda: frozen, metadata={"doc": doc, "kind": kind})
    return field(default=default, metadata={"doc": doc, "kind": kind})


@dataclass(frozen=True)
class ServerConfig:
    listen_addr: str = key(":8443", "main listener, host:port (all routes)")
    protocol: str = key("https", "http, https or auto (TLS if cert and key are set)")
    external_url: str = key("localhost:8443", "base of link URLs and of this node's endpoint")
    cert_file: str = key("server.crt", "TLS certificate (PEM), for https and QUIC")
    key_file: str = key("server.key", "TLS private key (PEM), for https and QUIC")
    enable_quic: bool = key(False, "serve HTTP/3 over QUIC on quic_listen_addr")
    quic_listen_addr: str = key(":8443", "UDP host:port of the HTTP/3 listener")
    read_timeout: float = key(30.0, "max stall while reading headers or a body", DURATION)
    write_timeout: float = key(30.0, "max stall while writing a response", DURATION)
    file_op_timeout: float = key(10.0, "bound on opening a backend read", DURATION)
    metadata_op_timeout: float = key(5.0, "bound on each metadata store call", DURATION)
    max_upload_size: int = key(10737418240, "largest accepted upload body in bytes (413 above)")
    max_connections: int = key(
        4096, "open client connections in total; more are closed at once (keep below ulimit -n)"
    )
    max_connections_per_ip: int = key(
        128, "open connections per client IP; more from that IP are closed at once"
    )
    workers: int = key(1, "processes serving the main port, 1-64; 1 with raft (docs/workers.md)")


@dataclass(frozen=True)
class AuthConfig:
    api_keys: tuple[str, ...] = key((), "API keys; key i authenticates as user api-user-<i>")
    api_key_users: Mapping[str, str] = key({}, "user ID -> API key")
    internal_proxy_secret: str = key(
        "change-me-internal-secret", "admin secret used between nodes (never the default)"
    )
    single_use_link_secret: str = key(
        "change-me-link-secret", "HMAC secret of single-use download links"
    )


@dataclass(frozen=True)
class LogConfig:
    level: str = key("info", "debug, info, warn or error")
    format: str = key("json", "json, or anything else for console lines")


@dataclass(frozen=True)
class MetricsConfig:
    listen_addr: str = key(":9090", 'unauthenticated /metrics listener; "" disables it')


@dataclass(frozen=True)
class BackendConfig:
    default_backend: str = key("localfs", "where new files go: localfs or s3")
    localfs_root_path: str = key("/var/lib/callfs", 'local file root; "" disables localfs')
    s3_access_key: str = key("", "static S3 access key (else the default credential chain)")
    s3_secret_key: str = key("", "static S3 secret key")
    s3_region: str = key("us-east-1", "S3 region")
    s3_bucket_name: str = key("", 'S3 bucket; "" disables S3')
    s3_endpoint: str = key("", "custom S3 endpoint (path-style addressing)")
    s3_server_side_encryption: str = key("AES256", 'AES256, aws:kms or "" (MinIO needs "")')
    s3_acl: str = key("private", 'canned ACL; "" sends none')
    s3_kms_key_id: str = key("", "KMS key id used with aws:kms")
    internal_proxy_skip_tls_verify: bool = key(False, "do not verify other nodes' certificates")
    internal_proxy_ca_file: str = key("", "extra CA (PEM) trusted for other nodes' certificates")


@dataclass(frozen=True)
class MetadataStoreConfig:
    type: str = key("postgres", "postgres, sqlite, redis or raft")
    dsn: str = key("postgres://callfs:callfs@localhost/callfs?sslmode=require", "PostgreSQL DSN")
    sqlite_path: str = key("./callfs.sqlite3", "SQLite database file")
    redis_addr: str = key("localhost:6379", "Redis host:port")
    redis_password: str = key("", "Redis password")
    redis_db: int = key(0, "Redis database number")
    redis_key_prefix: str = key(
        "callfs:", 'prefix of every metadata key; keys under prefix + "lock:" are left to locks'
    )


@dataclass(frozen=True)
class RaftConfig:
    enabled: bool = key(False, "forced on when metadata_store.type is raft")
    bootstrap: bool = key(False, "exactly one node bootstraps the group")
    node_id: str = key("callfs-node-1", "this node's Raft ID")
    bind_addr: str = key("127.0.0.1:7000", "Raft TCP host:port")
    data_dir: str = key("./raft", "Raft logs and snapshots")
    peers: Mapping[str, str] = key({}, "node ID -> Raft address")
    api_peer_endpoints: Mapping[str, str] = key({}, "node ID -> API base URL")
    apply_timeout: float = key(10.0, "bound on one commit", DURATION)
    forward_timeout: float = key(10.0, "bound on forwarding to the leader", DURATION)
    snapshot_interval: float = key(60.0, "time between snapshots", DURATION)
    snapshot_threshold: int = key(256, "entries between snapshots")
    retain_snapshot_count: int = key(
        2,
        "snapshot files kept (the current one and the files before its last database copies;"
        " `docs/raft.md`)",
    )


@dataclass(frozen=True)
class DlmConfig:
    type: str = key("redis", "redis or local (single node only)")
    redis_addr: str = key("localhost:6379", "Redis host:port for locks")
    redis_password: str = key("", "Redis password for locks")
    redis_db: int = key(0, "Redis database number for locks")
    redis_key_prefix: str = key(
        "callfs:lock:",
        'prefix of every lock key; on the metadata Redis db: the metadata prefix + "lock:", '
        "or apart from it",
    )
    lock_timeout: float = key(30.0, "how long a request waits for a path lock", DURATION)


@dataclass(frozen=True)
class HaConfig:
    replication_enabled: bool = key(False, "copy file changes to the replica backend")
    require_replica_success: bool = key(False, "fail the request when the replica fails")
    replica_backend: str = key("", "localfs or s3")


@dataclass(frozen=True)
class InstanceDiscoveryConfig:
    instance_id: str = key("callfs-instance-1", "this node's ID (owner node of its files)")
    peer_endpoints: Mapping[str, str] = key({}, "other node IDs -> API base URL")


@dataclass(frozen=True)
class ErasureConfig:
    enabled: bool = key(False, "accept erasure-coded uploads (every node reads and deletes them)")
    data_shards: int = key(0, "default data shards (< 2 means 4)")
    parity_shards: int = key(0, "default parity shards (< 1 means 2)")
    min_file_size: int = key(0, "accepted; no effect")
    shard_path: str = key("", "accepted; no effect")
    shard_backend: str = key("", "s3 keeps this node's shards in the bucket, else localfs")
    repair_interval: float = key(
        600.0, "time between automatic repair passes (one node at a time); 0 disables", DURATION
    )


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    metadata_store: MetadataStoreConfig = field(default_factory=MetadataStoreConfig)
    raft: RaftConfig = field(default_factory=RaftConfig)
    dlm: DlmConfig = field(default_factory=DlmConfig)
    ha: HaConfig = field(default_factory=HaConfig)
    instance_discovery: InstanceDiscoveryConfig = field(default_factory=InstanceDiscoveryConfig)
    erasure: ErasureConfig = field(default_factory=ErasureConfig)


def section_classes() -> dict[str, type[Any]]:
    """Section name -> its dataclass (resolved, not string annotations)."""
    hints = {
        "server": ServerConfig,
        "auth": AuthConfig,
        "log": LogConfig,
        "metrics": MetricsConfig,
        "backend": BackendConfig,
        "metadata_store": MetadataStoreConfig,
        "raft": RaftConfig,
        "dlm": DlmConfig,
        "ha": HaConfig,
        "instance_discovery": InstanceDiscoveryConfig,
        "erasure": ErasureConfig,
    }
    return hints


def all_keys() -> list[tuple[str, dataclasses.Field[Any]]]:
    """Every ``(dotted key, field)`` in declaration order."""
    out = []
    for section, cls in section_classes().items():
        for f in dataclasses.fields(cls):
            out.append((f"{section}.{f.name}", f))
    return out
