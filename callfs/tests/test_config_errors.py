"""Errors that say what to do (issue 13): one test per row of the error list.

Config errors name the dotted key and the fix and are all reported at once (the contract's message
first, API.md §18/§19); ``config validate`` adds a summary of what will run; a store that cannot be
opened names its address and the cause; a missing driver names the extra to install; locks get
their own Redis db and key prefix, which cannot collide with the metadata store's keys.
Stores that must misbehave are private servers (``services.py``), never the shared ones.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from click.testing import CliRunner

from callfs.cli import cli
from callfs.config import load_config
from callfs.config.loader import NO_STALL_LIMIT, ConfigProblems, load_config_report
from callfs.config.validate import LOCK_NAMESPACE, mask_url
from callfs.daemon import make_lock_manager, make_metadata_store
from callfs.errors import ConfigError, Unavailable
from callfs.locks.redis import RedisLockManager
from callfs.metadata.postgres import PostgresMetadataStore
from callfs.metadata.redis import RedisMetadataStore
from callfs.tests.services import PrivatePostgres, PrivateRedis, free_port
from callfs.tests.services import private_postgres as _private_postgres
from callfs.tests.services import private_redis as _private_redis

REPO = Path(__file__).resolve().parents[2]
GOOD = {
    "CALLFS_AUTH__API_KEYS": "k" * 16,
    "CALLFS_AUTH__INTERNAL_PROXY_SECRET": "s" * 20,
    "CALLFS_AUTH__SINGLE_USE_LINK_SECRET": "l" * 20,
}


def report(tmp_path: Path, env: dict[str, str] | None = None, text: str | None = None) -> Any:
    path = None
    if text is not None:
        path = str(tmp_path / "c.yaml")
        Path(path).write_text(text)
    return load_config_report(path, env={**GOOD, **(env or {})}, cwd=tmp_path)


def problems(tmp_path: Path, env: dict[str, str] | None = None, text: str | None = None) -> Any:
    with pytest.raises(ConfigProblems) as info:
        report(tmp_path, env, text)
    return info.value


# ---- unknown keys: named with the nearest known one (accepted, as §18 says) -------------------


def test_unknown_keys_name_the_nearest_known_key(tmp_path: Path) -> None:
    loaded = report(
        tmp_path,
        {"CALLFS_DLM__LOCK_TIMEOT": "5s"},
        "server:\n  listn_addr: ':9000'\nmetadata:\n  type: sqlite\nzzz: {a: 1}\n",
    )
    assert loaded.config.server.listen_addr == ":8443"  # §18: unknown keys are ignored
    assert loaded.warnings == (
        "unknown key server.listn_addr is ignored; did you mean server.listen_addr?",
        "unknown section metadata is ignored; did you mean metadata_store?",
        "unknown section zzz is ignored; docs/configuration.md lists every key",
        "unknown key dlm.lock_timeot is ignored; did you mean dlm.lock_timeout?",
    )


def test_unknown_key_is_named_when_validation_fails(tmp_path: Path) -> None:
    exc = problems(
        tmp_path,
        {"CALLFS_METADATA_STORE__TYPE": "sqlite", "CALLFS_METADATA_STORE__SQLITE_PATH": ""},
        "metadata_store:\n  sqlite_pth: ./x.db\n",
    )
    assert exc.message == (
        "config validation failed: metadata_store.sqlite_path is required when "
        "metadata_store.type=sqlite"
    )
    assert str(exc).splitlines()[1:] == [
        "  - warning: unknown key metadata_store.sqlite_pth is ignored; "
        "did you mean metadata_store.sqlite_path?"
    ]


# ---- ports out of range in listen addresses --------------------------------------------------


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"CALLFS_SERVER__LISTEN_ADDR": ":70000"},
            'server.listen_addr ":70000": port 70000 is out of range 0-65535',
        ),
        (
            {"CALLFS_METRICS__LISTEN_ADDR": "127.0.0.1:http"},
            'metrics.listen_addr "127.0.0.1:http": port "http" is not a number; use host:port, '
            'e.g. ":8443" or "127.0.0.1:8443"',
        ),
        (
            {"CALLFS_SERVER__LISTEN_ADDR": "localhost"},
            'server.listen_addr "localhost" must be host:port, e.g. ":8443" or "127.0.0.1:8443"',
        ),
        (
            {"CALLFS_DLM__REDIS_ADDR": "localhost:0"},
            'dlm.redis_addr "localhost:0": port 0 is out of range 1-65535',
        ),
        (
            {"CALLFS_METADATA_STORE__TYPE": "raft", "CALLFS_RAFT__BIND_ADDR": "[::1]:99999"},
            'raft.bind_addr "[::1]:99999": port 99999 is out of range 0-65535',
        ),
    ],
)
def test_ports_out_of_range(tmp_path: Path, env: dict[str, str], message: str) -> None:
    assert problems(tmp_path, env).message == f"config validation failed: {message}"


def test_good_addresses_pass(tmp_path: Path) -> None:
    env = {
        "CALLFS_SERVER__LISTEN_ADDR": "127.0.0.1:0",
        "CALLFS_METRICS__LISTEN_ADDR": "[::1]:9090",
        "CALLFS_DLM__REDIS_ADDR": "redis.internal",  # no port: 6379
    }
    assert report(tmp_path, env).config.server.listen_addr == "127.0.0.1:0"


# ---- unknown log levels (§17: they mean info, so a warning) ----------------------------------


def test_unknown_log_level(tmp_path: Path) -> None:
    loaded = report(tmp_path, {"CALLFS_LOG__LEVEL": "warning"})
    assert loaded.warnings == (
        'log.level "warning" is not one of: debug, info, warn, error, so it means info; '
        'did you mean "warn"?',
    )
    assert report(tmp_path, {"CALLFS_LOG__LEVEL": "DEBUG"}).warnings == ()


# ---- DSN schemes other than postgres ----------------------------------------------------------


@pytest.mark.parametrize(
    ("dsn", "got"),
    [("mysql://u:p@h/db", 'scheme "mysql"'), ("host=db user=callfs", "no scheme")],
)
def test_dsn_scheme(tmp_path: Path, dsn: str, got: str) -> None:
    exc = problems(tmp_path, {"CALLFS_METADATA_STORE__DSN": dsn})
    assert exc.message == (
        f"config validation failed: metadata_store.dsn must be a postgres:// or postgresql:// "
        f"URL (got {got}), e.g. postgres://user:password@host:5432/dbname?sslmode=require"
    )
    assert "u:p" not in str(exc)


def test_postgresql_scheme_is_fine(tmp_path: Path) -> None:
    report(tmp_path, {"CALLFS_METADATA_STORE__DSN": "postgresql://u@h/db"})


# ---- default backend without its storage ------------------------------------------------------


def test_a_default_backend_without_its_storage_is_a_warning(tmp_path: Path) -> None:
    """§2: an empty bucket or root disables that backend (what needs it answers 500). A config
    audit found these configs refused; the contract accepts them, so they are warnings."""
    loaded = report(tmp_path, {"CALLFS_BACKEND__DEFAULT_BACKEND": "s3"})
    assert loaded.config.backend.default_backend == "s3"
    assert (
        "backend.default_backend is s3 but backend.s3_bucket_name is empty (S3 is disabled, "
        "so new files get 500); set backend.s3_bucket_name or use "
        "backend.default_backend: localfs"
    ) in loaded.warnings
    loaded = report(tmp_path, {"CALLFS_BACKEND__LOCALFS_ROOT_PATH": ""})
    assert any(
        w.startswith("backend.default_backend is localfs but backend.localfs_root_path is empty")
        for w in loaded.warnings
    )
    env = {"CALLFS_BACKEND__DEFAULT_BACKEND": "s3", "CALLFS_BACKEND__S3_BUCKET_NAME": "b"}
    assert not any("default_backend" in w for w in report(tmp_path, env).warnings)


def test_our_checks_never_come_before_the_contracts_first_message(tmp_path: Path) -> None:
    """From the config audit: ``server.workers: 0`` and a negative ``erasure.repair_interval``
    were reported before the contract's first failure; a ``redis_db`` below 0 was refused
    while Redis was not even used; a 0 metadata timeout made every write a 503."""
    env = {"CALLFS_SERVER__WORKERS": "0", "CALLFS_DLM__TYPE": "zk"}
    assert problems(tmp_path, env).message == (
        "config validation failed: dlm.type must be one of: redis, local"
    )
    env = {"CALLFS_ERASURE__REPAIR_INTERVAL": "-1s", "CALLFS_BACKEND__DEFAULT_BACKEND": "ftp"}
    assert problems(tmp_path, env).message == (
        'config validation failed: backend.default_backend must be one of: localfs, s3 (got "ftp")'
    )
    env = {"CALLFS_METADATA_STORE__TYPE": "sqlite", "CALLFS_METADATA_STORE__REDIS_DB": "-1"}
    assert report(tmp_path, env).config.metadata_store.redis_db == -1
    env = {"CALLFS_SERVER__METADATA_OP_TIMEOUT": "0s"}
    assert problems(tmp_path, env).message == (
        "config validation failed: server.metadata_op_timeout must be > 0 (a duration such as 10s)"
    )
    # v1's meaning of a 0 read or write timeout (Go's http.Server): no limit
    cfg = report(tmp_path, {"CALLFS_SERVER__WRITE_TIMEOUT": "0s"}).config
    assert cfg.server.write_timeout == NO_STALL_LIMIT


# ---- bare integers for durations (§18: a bare integer is nanoseconds, so a warning) -----------


def test_bare_integer_duration(tmp_path: Path) -> None:
    loaded = report(tmp_path, text="server:\n  read_timeout: 30\ndlm:\n  lock_timeout: '5'\n")
    assert loaded.config.server.read_timeout == pytest.approx(30e-9)  # the contract's meaning
    assert loaded.warnings == (
        "server.read_timeout: 30 has no unit, so it means 30ns (a bare number is nanoseconds); "
        'write "30s" for seconds or "30ms" for milliseconds',
        "dlm.lock_timeout: 5 has no unit, so it means 5ns (a bare number is nanoseconds); "
        'write "5s" for seconds or "5ms" for milliseconds',
    )
    # Go-style nanosecond counts and 0 are clearly meant
    text = "server:\n  read_timeout: 30000000000\n  write_timeout: 0\n"
    assert report(tmp_path, text=text).warnings == ()


# ---- all errors at once, the contract's message first -----------------------------------------


def test_all_errors_at_once(tmp_path: Path) -> None:
    env = {
        "CALLFS_DLM__TYPE": "etcd",
        "CALLFS_SERVER__LISTEN_ADDR": "",
        "CALLFS_SERVER__MAX_UPLOAD_SIZE": "0",
        "CALLFS_AUTH__API_KEYS": "",
        "CALLFS_METRICS__LISTEN_ADDR": ":65536",
        "CALLFS_BACKEND__DEFAULT_BACKEND": "s3",
        "CALLFS_SERVR__X": "1",
    }
    exc = problems(tmp_path, env)
    assert isinstance(exc, ConfigError)
    # §19: the first failure in the contract's order is the message, unchanged
    assert exc.message == "config validation failed: server.listen_addr is required"
    lines = str(exc).splitlines()
    assert lines[0] == exc.message
    assert lines[1:] == [
        "  - server.max_upload_size must be > 0",
        "  - dlm.type must be one of: redis, local",
        "  - auth.api_keys or auth.api_key_users must contain at least one key",
        '  - metrics.listen_addr ":65536": port 65536 is out of range 0-65535',
        "  - warning: unknown section servr is ignored; did you mean server?",
        f"  - warning: {exc.warnings[-1]}",
    ]
    assert exc.warnings[-1].startswith("backend.default_backend is s3")


def test_unmarshal_errors_at_once(tmp_path: Path) -> None:
    env = {"CALLFS_SERVER__READ_TIMEOUT": "soon", "CALLFS_SERVER__ENABLE_QUIC": "yes"}
    with pytest.raises(ConfigProblems) as info:
        report(tmp_path, env)
    assert info.value.message.startswith("failed to unmarshal config: server.enable_quic")
    assert info.value.problems[1].startswith("server.read_timeout")


def test_config_validate_lists_every_problem() -> None:
    env = {**GOOD, "CALLFS_SERVER__LISTEN_ADDR": "", "CALLFS_DLM__TYPE": "etcd"}
    result = CliRunner().invoke(cli, ["config", "validate"], env=env)
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        "Validating configuration...",
        "Configuration validation failed: config validation failed: server.listen_addr is required",
        "  - dlm.type must be one of: redis, local",
    ]


def test_config_validate_prints_warnings_on_stderr() -> None:
    env = {**GOOD, "CALLFS_LOG__LEVEL": "verbose"}
    result = CliRunner().invoke(cli, ["config", "validate"], env=env)
    assert result.exit_code == 0
    assert result.stderr.startswith('Warning: log.level "verbose" is not one of')
    assert "Warning" not in result.stdout


# ---- config validate --summary -----------------------------------------------------------------


def test_config_validate_summary() -> None:
    env = {
        **GOOD,
        "CALLFS_METADATA_STORE__DSN": "postgres://callfs:hunter22@db:5432/callfs?sslmode=require",
        "CALLFS_BACKEND__S3_BUCKET_NAME": "bkt",
        "CALLFS_SERVER__ENABLE_QUIC": "true",
    }
    result = CliRunner().invoke(cli, ["config", "validate", "--summary"], env=env)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[:9] == [  # §20.3's lines first, unchanged
        "Validating configuration...",
        "Configuration is valid",
        "Instance ID: callfs-instance-1",
        "Listen Address: :8443",
        "Metadata Store DSN: postgres:/***require",
        "Redis Address: localhost:6379",
        "Local FS Root: /var/lib/callfs",
        "S3 Bucket: bkt",
        "S3 Region: us-east-1",
    ]
    assert lines[9:] == [
        "Metadata Store: postgres at postgres://callfs:***@db:5432/callfs?sslmode=require",
        "Backends: localfs at /var/lib/callfs; s3 bucket bkt (us-east-1); new files go to localfs",
        'Locks: redis at localhost:6379 db 0, key prefix "callfs:lock:", wait up to 30s',
        "Protocol: https (cert server.crt, key server.key)",
        "Listeners: API https on :8443; HTTP/3 (QUIC) on udp :8443; "
        "metrics on :9090 (unauthenticated)",
    ]
    assert "hunter22" not in result.output


def test_summary_of_a_dev_like_node() -> None:
    env = {
        **GOOD,
        "CALLFS_METADATA_STORE__TYPE": "redis",
        "CALLFS_METADATA_STORE__REDIS_ADDR": "r:6380",
        "CALLFS_DLM__TYPE": "local",
        "CALLFS_SERVER__PROTOCOL": "http",
        "CALLFS_METRICS__LISTEN_ADDR": "",
    }
    result = CliRunner().invoke(cli, ["config", "validate", "--summary"], env=env)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-5:] == [
        'Metadata Store: redis at r:6380 db 0, key prefix "callfs:"',
        "Backends: localfs at /var/lib/callfs; new files go to localfs",
        "Locks: local (this process only: one node), wait up to 30s",
        "Protocol: http",
        "Listeners: API http on :8443; metrics only on the API port (authenticated)",
    ]


def test_summary_of_a_node_with_workers() -> None:
    env = {
        **GOOD,
        "CALLFS_METADATA_STORE__TYPE": "sqlite",
        "CALLFS_DLM__TYPE": "local",
        "CALLFS_SERVER__PROTOCOL": "http",
        "CALLFS_SERVER__WORKERS": "2",
        "CALLFS_METRICS__LISTEN_ADDR": "",
    }
    result = CliRunner().invoke(cli, ["config", "validate", "--summary"], env=env)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert (
        "Locks: local (each of the 2 processes its own; the store decides races), wait up to 30s"
        in lines
    )
    assert (
        "Listeners: API http on :8443 (2 processes); metrics only on the API port "
        "(authenticated)" in lines
    )


def test_mask_url() -> None:
    assert mask_url("postgres://u:secret@h/db") == "postgres://u:***@h/db"
    assert mask_url("postgres://u@h/db?password=secret&x=1") == "postgres://u@h/db?password=***&x=1"
    assert mask_url("postgres://h/db") == "postgres://h/db"


# ---- dlm.redis_db and dlm.redis_key_prefix; no collision with the metadata keys --------------


def test_dlm_redis_db_and_prefix_keys(tmp_path: Path) -> None:
    cfg = report(tmp_path).config
    assert (cfg.dlm.redis_db, cfg.dlm.redis_key_prefix) == (0, "callfs:lock:")
    env = {"CALLFS_DLM__REDIS_DB": "2", "CALLFS_DLM__REDIS_KEY_PREFIX": "app1-locks:"}
    cfg = report(tmp_path, env).config
    manager = make_lock_manager(cfg)
    assert isinstance(manager, RedisLockManager)
    assert (manager._db, manager._prefix) == (2, "app1-locks:")


async def test_lock_manager_uses_its_db_and_prefix(tmp_path: Path) -> None:
    with _private_redis(tmp_path) as rd:
        manager = RedisLockManager(rd.addr, db=3, key_prefix="app1-locks:")
        await manager.start()
        probe = aioredis.Redis(host="127.0.0.1", port=rd.port, db=3)
        try:
            async with manager.hold("file:/a", 1.0):
                assert await probe.exists("app1-locks:file:/a") == 1
        finally:
            await probe.aclose()
            await manager.close()


@pytest.mark.parametrize(
    ("env", "ok"),
    [
        ({}, True),  # defaults: callfs:lock: sits in the metadata store's reserved lock: space
        ({"CALLFS_DLM__REDIS_KEY_PREFIX": "callfs:"}, False),
        ({"CALLFS_DLM__REDIS_KEY_PREFIX": "callfs:lock:fil"}, True),
        ({"CALLFS_METADATA_STORE__REDIS_KEY_PREFIX": "callfs:lock:fil"}, False),
        ({"CALLFS_DLM__REDIS_KEY_PREFIX": "c"}, False),
        ({"CALLFS_DLM__REDIS_KEY_PREFIX": "locks:"}, True),
        ({"CALLFS_DLM__REDIS_KEY_PREFIX": "callfs:", "CALLFS_DLM__REDIS_DB": "1"}, True),
        ({"CALLFS_DLM__REDIS_KEY_PREFIX": "callfs:", "CALLFS_DLM__REDIS_ADDR": "other:6379"}, True),
        ({"CALLFS_DLM__REDIS_KEY_PREFIX": "callfs:", "CALLFS_DLM__REDIS_ADDR": "127.0.0.1"}, False),
    ],
)
def test_redis_prefixes_cannot_collide(tmp_path: Path, env: dict[str, str], ok: bool) -> None:
    env = {"CALLFS_METADATA_STORE__TYPE": "redis", **env}
    if ok:
        report(tmp_path, env)
        return
    message = problems(tmp_path, env).message
    assert re.match(
        r'config validation failed: dlm.redis_key_prefix ".*" overlaps '
        r'metadata_store.redis_key_prefix ".*" on the same Redis database',
        message,
    ), message


def test_metadata_keys_never_use_the_lock_namespace() -> None:
    """Every key the Redis metadata store and its WorkQueue write is ``P`` + a tag; no tag starts
    with ``lock:``, so ``P lock:...`` (the default lock keys) can never be a metadata key."""
    tags: set[str] = set()
    for name in ("callfs/metadata/redis.py", "callfs/jobs/redis.py"):
        source = (REPO / name).read_text()
        tags |= set(re.findall(r"\{self\.(?:_?p)\}([A-Za-z]*:?)", source))
        tags |= set(re.findall(r"p \.\. '([A-Za-z]*:?)'", source))
    assert {"e:", "c:", "l:", "x:", "w:", "B", "L", "W", "wid"} <= tags
    assert not [t for t in tags if LOCK_NAMESPACE.startswith(t) or t.startswith("lock")]


async def test_default_keys_are_disjoint_on_one_redis(tmp_path: Path) -> None:
    """Metadata store and locks with their defaults on one Redis: every key either side writes
    stays on its side of ``callfs:lock:``."""
    with _private_redis(tmp_path) as rd:
        cfg = load_config(
            None,
            env={
                **GOOD,
                "CALLFS_METADATA_STORE__TYPE": "redis",
                "CALLFS_METADATA_STORE__REDIS_ADDR": rd.addr,
                "CALLFS_DLM__REDIS_ADDR": rd.addr,
            },
            cwd=tmp_path,
        )
        store = make_metadata_store(cfg)
        locks = make_lock_manager(cfg)
        assert isinstance(store, RedisMetadataStore) and isinstance(locks, RedisLockManager)
        await store.start()
        await locks.start()
        probe = aioredis.Redis(host="127.0.0.1", port=rd.port, decode_responses=True)
        try:
            async with locks.hold("file:/a", 1.0), locks.hold("dir:/d", 1.0):
                keys = set(await probe.keys("*"))
        finally:
            await probe.aclose()
            await locks.close()
            await store.close()
        lock_keys = {k for k in keys if k.startswith("callfs:lock:")}
        assert lock_keys == {"callfs:lock:file:/a", "callfs:lock:dir:/d"}
        assert keys - lock_keys == {"callfs:e:/"}


# ---- start-up: stores that cannot be opened ----------------------------------------------------


@pytest.fixture(scope="module")
def pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivatePostgres]:
    with _private_postgres(tmp_path_factory.mktemp("pg")) as server:
        yield server


async def pg_start_error(dsn: str) -> str:
    store = PostgresMetadataStore(dsn, op_timeout=5.0, min_size=1, max_size=1)
    with pytest.raises(Unavailable) as info:
        await store.start()
    await store.close()
    return info.value.message


async def test_postgres_connection_refused() -> None:
    port = free_port()
    message = await pg_start_error(f"postgres://callfs:pw@127.0.0.1:{port}/callfs")
    assert message == (
        f"cannot open the PostgreSQL metadata store at postgres://callfs@127.0.0.1:{port}/callfs: "
        "connection refused (is PostgreSQL running and listening there?)"
    )


async def test_postgres_database_missing(pg: PrivatePostgres) -> None:
    message = await pg_start_error(f"postgres://postgres@127.0.0.1:{pg.port}/nope?sslmode=disable")
    assert message == (
        f"cannot open the PostgreSQL metadata store at postgres://postgres@127.0.0.1:{pg.port}/"
        'nope: database "nope" does not exist (create it, e.g. createdb, or fix the database '
        "name in metadata_store.dsn)"
    )


async def test_postgres_role_unknown(pg: PrivatePostgres) -> None:
    message = await pg_start_error(f"postgres://ghost@127.0.0.1:{pg.port}/postgres?sslmode=disable")
    assert message.startswith(
        f"cannot open the PostgreSQL metadata store at postgres://ghost@127.0.0.1:{pg.port}/"
        'postgres: role "ghost" does not exist'
    )
    assert message.endswith("(create the role, or fix the user name in metadata_store.dsn)")


async def test_postgres_without_ssl(pg: PrivatePostgres) -> None:
    message = await pg_start_error(
        f"postgres://postgres@127.0.0.1:{pg.port}/postgres?sslmode=require"
    )
    assert message.endswith(
        "the server does not support SSL (enable SSL on the server, or use sslmode=disable "
        "or sslmode=prefer in metadata_store.dsn)"
    )


async def test_postgres_permission_denied(pg: PrivatePostgres) -> None:
    admin = await asyncpg.connect(pg.dsn)
    try:
        await admin.execute("CREATE ROLE outsider LOGIN")
        await admin.execute("CREATE DATABASE locked")
        await admin.execute("REVOKE CONNECT ON DATABASE locked FROM PUBLIC")
    finally:
        await admin.close()
    message = await pg_start_error(
        f"postgres://outsider:pw@127.0.0.1:{pg.port}/locked?sslmode=disable"
    )
    assert message == (
        f"cannot open the PostgreSQL metadata store at postgres://outsider@127.0.0.1:{pg.port}/"
        'locked: permission denied for database "locked"; User does not have CONNECT privilege. '
        "(grant the role access to the database and schema)"
    )


async def test_redis_store_connection_refused() -> None:
    port = free_port()
    store = RedisMetadataStore(f"127.0.0.1:{port}", db=2, op_timeout=2.0)
    with pytest.raises(Unavailable) as info:
        await store.start()
    assert info.value.message == (
        f"cannot open the Redis metadata store at 127.0.0.1:{port} db 2: connection refused "
        "(is redis-server running and listening there?)"
    )


async def test_redis_lock_service_connection_refused() -> None:
    port = free_port()
    manager = RedisLockManager(f"127.0.0.1:{port}", op_timeout=2.0)
    with pytest.raises(Unavailable) as info:
        await manager.start()
    assert info.value.message == (
        f"cannot reach the Redis lock service (dlm) at 127.0.0.1:{port} db 0: connection refused "
        "(is redis-server running and listening there?)"
    )


async def test_redis_db_missing_and_wrong_password(tmp_path: Path) -> None:
    with _private_redis(tmp_path) as rd:
        store = RedisMetadataStore(rd.addr, db=999, op_timeout=2.0)
        with pytest.raises(Unavailable) as info:
            await store.start()
        assert info.value.message.startswith(
            f"cannot open the Redis metadata store at {rd.addr} db 999: database does not exist "
            "on that server (DB index is out of range; lower metadata_store.redis_db"
        )
        await _require_password(rd, "right-password")
        manager = RedisLockManager(rd.addr, password="wrong-password", op_timeout=2.0)
        with pytest.raises(Unavailable) as info:
            await manager.start()
        assert info.value.message.startswith(
            f"cannot reach the Redis lock service (dlm) at {rd.addr} db 0: authentication failed "
            "(check dlm.redis_password)"
        )


async def _require_password(rd: PrivateRedis, password: str) -> None:
    r = aioredis.Redis(host="127.0.0.1", port=rd.port)
    try:
        await r.config_set("requirepass", password)
    finally:
        await r.aclose()


# ---- start-up: a driver that is not installed --------------------------------------------------


@pytest.mark.parametrize(
    ("env", "module", "driver", "message"),
    [
        (
            {},
            "callfs.metadata.postgres",
            "asyncpg",
            "metadata_store.type=postgres needs the asyncpg driver, which is not installed: "
            "pip install 'callfs[postgres]'",
        ),
        (
            {"CALLFS_METADATA_STORE__TYPE": "redis"},
            "callfs.metadata.redis",
            "redis",
            "metadata_store.type=redis needs the redis driver, which is not installed: "
            "pip install 'callfs[redis]'",
        ),
    ],
)
def test_missing_store_driver_names_the_extra(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
    module: str,
    driver: str,
    message: str,
) -> None:
    cfg = report(tmp_path, env).config
    _hide(monkeypatch, module, driver)
    with pytest.raises(ConfigError) as info:
        make_metadata_store(cfg)
    assert info.value.message == message


def test_missing_lock_driver_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = report(tmp_path).config
    _hide(monkeypatch, "callfs.locks.redis", "redis")
    with pytest.raises(ConfigError) as info:
        make_lock_manager(cfg)
    assert info.value.message == (
        "dlm.type=redis needs the redis driver, which is not installed: "
        "pip install 'callfs[redis]' (or dlm.type: local for a single node)"
    )


def _hide(monkeypatch: pytest.MonkeyPatch, module: str, driver: str) -> None:
    """Make ``import <driver>`` fail as if it were not installed (restored after the test)."""
    monkeypatch.delitem(sys.modules, module, raising=False)
    monkeypatch.setitem(sys.modules, driver, None)  # type: ignore[arg-type]
    for name in [n for n in sys.modules if n.startswith(driver + ".")]:
        monkeypatch.setitem(sys.modules, name, None)  # type: ignore[arg-type]


def test_negative_redis_db(tmp_path: Path) -> None:
    exc = problems(tmp_path, {"CALLFS_DLM__REDIS_DB": "-1"})
    assert exc.message == "config validation failed: dlm.redis_db must be >= 0 (got -1)"


async def test_sqlite_store_that_cannot_be_opened_names_the_file_and_cause(tmp_path: Path) -> None:
    from callfs.errors import Unavailable
    from callfs.metadata.sqlite import SqliteMetadataStore

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    store = SqliteMetadataStore(str(blocker / "meta.sqlite3"))
    with pytest.raises(Unavailable) as info:
        await store.start()
    assert str(blocker / "meta.sqlite3") in info.value.message
    assert "Not a directory" in info.value.message or "File exists" in info.value.message


# ---- YAML booleans: only YAML 1.2's (§18), so yes/no/on/off stay the text written -----------


def test_unquoted_yes_no_on_off_stay_text_in_a_config_file(tmp_path: Path) -> None:
    """YAML 1.1 read them as booleans: a secret ``yes`` became "true", a user ``on:`` "True"."""
    text = (
        "auth:\n"
        "  internal_proxy_secret: yes\n"
        "  single_use_link_secret: off\n"
        "  api_key_users:\n"
        "    on: key-of-the-user-named-on\n"
        "server:\n"
        "  enable_quic: false\n"
    )
    path = tmp_path / "c.yaml"
    path.write_text(text)
    loaded = load_config_report(str(path), env={"CALLFS_AUTH__API_KEYS": "k" * 16}, cwd=tmp_path)
    auth = loaded.config.auth
    assert auth.internal_proxy_secret == "yes"
    assert auth.single_use_link_secret == "off"
    assert auth.api_key_users["on"] == "key-of-the-user-named-on"
    assert loaded.config.server.enable_quic is False


@pytest.mark.parametrize("word", ["yes", "no", "on", "off"])
def test_a_boolean_key_refuses_yes_no_on_off_as_the_environment_does(
    tmp_path: Path, word: str
) -> None:
    with pytest.raises(ConfigError, match=f"invalid boolean '{word}'"):
        report(tmp_path, text=f"server:\n  enable_quic: {word}\n")


def test_a_raft_node_that_neither_bootstraps_nor_lists_members_is_warned_of(
    tmp_path: Path,
) -> None:
    """The server refuses such a node at start; ``config validate`` called it valid, silently."""
    env = {
        "CALLFS_METADATA_STORE__TYPE": "raft",
        "CALLFS_RAFT__NODE_ID": "node-4",
        "CALLFS_RAFT__BIND_ADDR": "127.0.0.1:9404",
        "CALLFS_RAFT__DATA_DIR": str(tmp_path / "raft"),
    }
    (warning,) = report(tmp_path, env).warnings
    assert warning.startswith("raft.peers is empty and raft.bootstrap is false")
    assert report(tmp_path, {**env, "CALLFS_RAFT__PEERS__N1": "127.0.0.1:9401"}).warnings == ()
    assert report(tmp_path, {**env, "CALLFS_RAFT__BOOTSTRAP": "true"}).warnings == ()
