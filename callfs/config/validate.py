"""Validation (API.md §19): sections in the contract's order, first failure wins. Pure: no files,
no network. Returns the message (the caller prefixes ``config validation failed: ``) or None."""

from __future__ import annotations

import re

from callfs.config.schema import AuthConfig, Config

DEFAULT_API_KEY = "default-api-key"
DEFAULT_INTERNAL_SECRET = "change-me-internal-secret"  # noqa: S105 - the refused placeholder
DEFAULT_LINK_SECRET = "change-me-link-secret"  # noqa: S105 - the refused placeholder
MIN_KEY_LENGTH = 16
_RESERVED_USER = re.compile(r"api-user-\d+")


def validate(cfg: Config) -> str | None:
    for check in (
        _server,
        _metadata_store,
        _dlm,
        _ha,
        _instance,
        lambda c: _auth(c.auth),
        _erasure,
        _default_backend,
    ):
        problem = check(cfg)
        if problem is not None:
            return problem
    return None


def _server(cfg: Config) -> str | None:
    s = cfg.server
    if not s.listen_addr:
        return "server.listen_addr is required"
    if s.protocol not in ("http", "https", "auto"):
        return "server.protocol must be one of: http, https, auto"
    if s.protocol == "https" and not (s.cert_file and s.key_file):
        return "server.cert_file and server.key_file are required when server.protocol=https"
    if s.enable_quic and not (s.cert_file and s.key_file):
        return "server.cert_file and server.key_file are required when server.enable_quic=true"
    if s.enable_quic and not s.quic_listen_addr:
        return "server.quic_listen_addr is required when server.enable_quic=true"
    if s.max_upload_size <= 0:
        return "server.max_upload_size must be > 0"
    for name in ("max_connections", "max_connections_per_ip"):
        if getattr(s, name) <= 0:
            return f"server.{name} must be > 0"
    return None


def _metadata_store(cfg: Config) -> str | None:
    m = cfg.metadata_store
    if m.type == "postgres":
        return None if m.dsn else "metadata_store.dsn is required when metadata_store.type=postgres"
    if m.type == "sqlite":
        if not m.sqlite_path:
            return "metadata_store.sqlite_path is required when metadata_store.type=sqlite"
        return None
    if m.type == "redis":
        if not m.redis_addr:
            return "metadata_store.redis_addr is required when metadata_store.type=redis"
        return None
    if m.type != "raft":
        return "metadata_store.type must be one of: postgres, sqlite, redis, raft"
    r = cfg.raft
    for name in ("node_id", "bind_addr", "data_dir"):
        if not getattr(r, name):
            return f"raft.{name} is required when metadata_store.type=raft"
    for name in (
        "apply_timeout",
        "forward_timeout",
        "snapshot_interval",
        "snapshot_threshold",
        "retain_snapshot_count",
    ):
        if getattr(r, name) <= 0:
            return f"raft.{name} must be > 0 when metadata_store.type=raft"
    return None


def _dlm(cfg: Config) -> str | None:
    d = cfg.dlm
    if d.type == "redis" and not d.redis_addr:
        return "dlm.redis_addr is required when dlm.type=redis"
    if d.type not in ("redis", "local"):
        return "dlm.type must be one of: redis, local"
    if d.lock_timeout <= 0:
        return "dlm.lock_timeout must be > 0"
    return None


def _ha(cfg: Config) -> str | None:
    if cfg.ha.replication_enabled and cfg.ha.replica_backend not in ("localfs", "s3"):
        return "ha.replica_backend must be one of: localfs, s3 when ha.replication_enabled=true"
    return None


def _instance(cfg: Config) -> str | None:
    if not cfg.instance_discovery.instance_id:
        return "instance_discovery.instance_id is required"
    return None


def _auth(a: AuthConfig) -> str | None:
    if not a.api_keys and not a.api_key_users:
        return "auth.api_keys or auth.api_key_users must contain at least one key"
    seen: dict[str, str] = {}
    for i, k in enumerate(a.api_keys):
        if k == DEFAULT_API_KEY:
            return f"auth.api_keys must not use default value '{DEFAULT_API_KEY}'"
        if len(k) < MIN_KEY_LENGTH:
            return "auth.api_keys: each key must be at least 16 characters"
        if k in seen:
            return f"auth.api_keys: key at index {i} is already configured for {seen[k]}"
        seen[k] = f"api_keys index {i}"
    for user in sorted(a.api_key_users):
        k = a.api_key_users[user]
        if not user.strip():
            return "auth.api_key_users: user ID must not be empty"
        if user in ("root", "internal-proxy") or _RESERVED_USER.fullmatch(user):
            return f'auth.api_key_users: user ID "{user}" is reserved'
        if k == DEFAULT_API_KEY:
            return f"auth.api_key_users must not use default value '{DEFAULT_API_KEY}'"
        if len(k) < MIN_KEY_LENGTH:
            return "auth.api_key_users: each key must be at least 16 characters"
        if k in seen:
            return f'auth.api_key_users: key for "{user}" is already configured for {seen[k]}'
        seen[k] = f'api_key_users "{user}"'
    if a.internal_proxy_secret in seen:
        return "auth.internal_proxy_secret must not be reused as an API key"
    if not a.internal_proxy_secret or a.internal_proxy_secret == DEFAULT_INTERNAL_SECRET:
        return "auth.internal_proxy_secret must be set and not use default value"
    if not a.single_use_link_secret or a.single_use_link_secret == DEFAULT_LINK_SECRET:
        return "auth.single_use_link_secret must be set and not use default value"
    return None


def _erasure(cfg: Config) -> str | None:
    if cfg.erasure.data_shards + cfg.erasure.parity_shards > 256:
        return "erasure.data_shards + erasure.parity_shards must not exceed 256"
    return None


def _default_backend(cfg: Config) -> str | None:
    value = cfg.backend.default_backend
    if value not in ("localfs", "s3", ""):
        return f'backend.default_backend must be one of: localfs, s3 (got "{value}")'
    return None
