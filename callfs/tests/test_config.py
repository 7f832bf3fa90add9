"""Configuration loading and validation (API.md §18, §19)."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest
import yaml

from callfs.config import load_config, parse_duration
from callfs.config.schema import all_keys
from callfs.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
GOOD_AUTH = {
    "CALLFS_AUTH__API_KEYS": "k" * 16,
    "CALLFS_AUTH__INTERNAL_PROXY_SECRET": "s" * 20,
    "CALLFS_AUTH__SINGLE_USE_LINK_SECRET": "l" * 20,
}


def load(tmp_path: Path, env: dict[str, str] | None = None, **kw: Any) -> Any:
    return load_config(kw.pop("path", None), env={**GOOD_AUTH, **(env or {})}, cwd=tmp_path, **kw)


def failure(tmp_path: Path, env: dict[str, str], base: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(None, env={**(GOOD_AUTH if base is None else base), **env}, cwd=tmp_path)
    return info.value.message


def test_defaults(tmp_path: Path) -> None:
    cfg = load(tmp_path)
    assert cfg.server.listen_addr == ":8443"
    assert cfg.server.protocol == "https"
    assert cfg.server.external_url == "localhost:8443"
    assert (cfg.server.cert_file, cfg.server.key_file) == ("server.crt", "server.key")
    assert cfg.server.read_timeout == 30.0 and cfg.server.metadata_op_timeout == 5.0
    assert cfg.server.max_upload_size == 10737418240
    assert cfg.metrics.listen_addr == ":9090"
    assert cfg.metadata_store.type == "postgres"
    assert cfg.metadata_store.dsn.endswith("sslmode=require")
    assert cfg.dlm.type == "redis" and cfg.dlm.lock_timeout == 30.0
    assert cfg.raft.snapshot_threshold == 256 and cfg.raft.apply_timeout == 10.0
    assert cfg.instance_discovery.instance_id == "callfs-instance-1"
    assert cfg.backend.localfs_root_path == "/var/lib/callfs"
    assert cfg.backend.s3_server_side_encryption == "AES256"
    assert cfg.erasure.data_shards == 0


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("300ms", 0.3),
        ("30s", 30.0),
        ("1m30s", 90.0),
        ("2h", 7200.0),
        ("1500000000", 1.5),
        ("1.5s", 1.5),
        ("10us", 1e-5),
        ("10µs", 1e-5),
        ("0", 0.0),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


def test_environment_overrides(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        {
            "CALLFS_SERVER__LISTEN_ADDR": ":9999",
            "CALLFS_SERVER__PROTOCOL": "HTTP",
            "CALLFS_SERVER__READ_TIMEOUT": "1m",
            "CALLFS_SERVER__ENABLE_QUIC": "T",
            "CALLFS_AUTH__API_KEYS": "k1k1k1k1k1k1k1k1,k2k2k2k2k2k2k2k2",
            "CALLFS_AUTH__API_KEY_USERS__ALICE": "a" * 16,
            "CALLFS_METADATA_STORE__REDIS_DB": "3",
            "CALLFS_INSTANCE_DISCOVERY__PEER_ENDPOINTS__NODE-B": "http://b:8443",
            "CALLFS_NOT_A_KEY": "ignored",
            "OTHER": "ignored",
        },
    )
    assert cfg.server.listen_addr == ":9999"
    assert cfg.server.protocol == "http"
    assert cfg.server.read_timeout == 60.0
    assert cfg.server.enable_quic is True
    assert cfg.auth.api_keys == ("k1k1k1k1k1k1k1k1", "k2k2k2k2k2k2k2k2")
    assert dict(cfg.auth.api_key_users) == {"alice": "a" * 16}
    assert cfg.metadata_store.redis_db == 3
    assert dict(cfg.instance_discovery.peer_endpoints) == {"node-b": "http://b:8443"}


def test_file_layers_and_search(tmp_path: Path) -> None:
    (tmp_path / "config.yml").write_text("server:\n  listen_addr: ':1111'\nlog: {level: debug}\n")
    (tmp_path / "config.json").write_text(json.dumps({"server": {"listen_addr": ":2222"}}))
    cfg = load(tmp_path, {"CALLFS_LOG__FORMAT": "console"})
    assert cfg.server.listen_addr == ":1111"  # config.yaml, config.yml, config.json in order
    assert (cfg.log.level, cfg.log.format) == ("debug", "console")
    (tmp_path / "config.yaml").write_text("server:\n  listen_addr: ':3333'\n")
    assert load(tmp_path).server.listen_addr == ":3333"
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"auth": {"api_key_users": {"bob": "b" * 16}}}))
    cfg = load(tmp_path, path=str(other), env={"CALLFS_AUTH__API_KEY_USERS__ALICE": "a" * 16})
    assert dict(cfg.auth.api_key_users) == {"bob": "b" * 16, "alice": "a" * 16}


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^specified config file .*nope.yaml not found: "):
        load(tmp_path, path=str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("server: [unclosed")
    with pytest.raises(ConfigError, match=r"^failed to load config file .*bad.yaml: "):
        load(tmp_path, path=str(bad))
    # a syntax error names what and where, never the text around it (PyYAML quotes the line:
    # an unterminated secret went to stderr and the journal; found by a security audit)
    for text in (
        'auth:\n  internal_proxy_secret: "TOPSECRET-INTERNAL-123456\n',
        "auth:\n  api_keys: [TOPSECRET-KEY-0123456789\n",
        # PyYAML's problem text quotes an alias or a tag too (found by a review of the fix)
        "auth:\n  internal_proxy_secret: *TOPSECRET-ALIAS\n",
        "auth:\n  internal_proxy_secret: !TOPSECRET-TAG x\n",
    ):
        bad.write_text(text)
        with pytest.raises(ConfigError) as info:
            load(tmp_path, path=str(bad))
        assert "TOPSECRET" not in str(info.value), str(info.value)
        assert "line " in info.value.message
    other = tmp_path / "bad.json"
    other.write_text('{"auth": {"internal_proxy_secret": "TOPSECRET-JSON-1234" ')
    with pytest.raises(ConfigError) as info:
        load(tmp_path, path=str(other))
    assert "TOPSECRET" not in str(info.value) and "line 1" in info.value.message
    toml = tmp_path / "c.toml"
    toml.write_text("x=1")
    with pytest.raises(ConfigError, match=r"^failed to load config file "):
        load(tmp_path, path=str(toml))
    with pytest.raises(ConfigError, match=r"^failed to unmarshal config: server.read_timeout"):
        load(tmp_path, {"CALLFS_SERVER__READ_TIMEOUT": "soon"})
    with pytest.raises(ConfigError, match=r"^failed to unmarshal config: server.enable_quic"):
        load(tmp_path, {"CALLFS_SERVER__ENABLE_QUIC": "yes"})


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CALLFS_SERVER__LISTEN_ADDR": ""}, "server.listen_addr is required"),
        ({"CALLFS_SERVER__PROTOCOL": "ftp"}, "server.protocol must be one of: http, https, auto"),
        (
            {"CALLFS_SERVER__CERT_FILE": ""},
            "server.cert_file and server.key_file are required when server.protocol=https",
        ),
        (
            {
                "CALLFS_SERVER__PROTOCOL": "http",
                "CALLFS_SERVER__KEY_FILE": "",
                "CALLFS_SERVER__ENABLE_QUIC": "true",
            },
            "server.cert_file and server.key_file are required when server.enable_quic=true",
        ),
        (
            {"CALLFS_SERVER__ENABLE_QUIC": "true", "CALLFS_SERVER__QUIC_LISTEN_ADDR": ""},
            "server.quic_listen_addr is required when server.enable_quic=true",
        ),
        ({"CALLFS_SERVER__MAX_UPLOAD_SIZE": "0"}, "server.max_upload_size must be > 0"),
        (
            {"CALLFS_METADATA_STORE__DSN": ""},
            "metadata_store.dsn is required when metadata_store.type=postgres",
        ),
        (
            {"CALLFS_METADATA_STORE__TYPE": "sqlite", "CALLFS_METADATA_STORE__SQLITE_PATH": ""},
            "metadata_store.sqlite_path is required when metadata_store.type=sqlite",
        ),
        (
            {"CALLFS_METADATA_STORE__TYPE": "redis", "CALLFS_METADATA_STORE__REDIS_ADDR": ""},
            "metadata_store.redis_addr is required when metadata_store.type=redis",
        ),
        (
            {"CALLFS_METADATA_STORE__TYPE": "mongo"},
            "metadata_store.type must be one of: postgres, sqlite, redis, raft",
        ),
        (
            {"CALLFS_METADATA_STORE__TYPE": "raft", "CALLFS_RAFT__DATA_DIR": ""},
            "raft.data_dir is required when metadata_store.type=raft",
        ),
        (
            {"CALLFS_METADATA_STORE__TYPE": "raft", "CALLFS_RAFT__SNAPSHOT_THRESHOLD": "0"},
            "raft.snapshot_threshold must be > 0 when metadata_store.type=raft",
        ),
        ({"CALLFS_DLM__REDIS_ADDR": ""}, "dlm.redis_addr is required when dlm.type=redis"),
        ({"CALLFS_DLM__TYPE": "etcd"}, "dlm.type must be one of: redis, local"),
        ({"CALLFS_DLM__LOCK_TIMEOUT": "0s"}, "dlm.lock_timeout must be > 0"),
        (
            {"CALLFS_HA__REPLICATION_ENABLED": "1"},
            "ha.replica_backend must be one of: localfs, s3 when ha.replication_enabled=true",
        ),
        (
            {"CALLFS_INSTANCE_DISCOVERY__INSTANCE_ID": ""},
            "instance_discovery.instance_id is required",
        ),
        (
            {"CALLFS_AUTH__API_KEYS": ""},
            "auth.api_keys or auth.api_key_users must contain at least one key",
        ),
        (
            {"CALLFS_AUTH__API_KEYS": "default-api-key"},
            "auth.api_keys must not use default value 'default-api-key'",
        ),
        (
            {"CALLFS_AUTH__API_KEYS": "short"},
            "auth.api_keys: each key must be at least 16 characters",
        ),
        (
            {"CALLFS_AUTH__API_KEYS": "k" * 16 + "," + "k" * 16},
            "auth.api_keys: key at index 1 is already configured for api_keys index 0",
        ),
        (
            {"CALLFS_AUTH__API_KEY_USERS__ROOT": "r" * 16},
            'auth.api_key_users: user ID "root" is reserved',
        ),
        (
            {"CALLFS_AUTH__API_KEY_USERS__API-USER-3": "r" * 16},
            'auth.api_key_users: user ID "api-user-3" is reserved',
        ),
        (
            {"CALLFS_AUTH__API_KEY_USERS__BOB": "k" * 16},
            'auth.api_key_users: key for "bob" is already configured for api_keys index 0',
        ),
        # §19's order for each key: the key's own checks come before its user ID's
        (
            {"CALLFS_AUTH__API_KEY_USERS__ROOT": "short"},
            "auth.api_key_users: each key must be at least 16 characters",
        ),
        (
            {"CALLFS_AUTH__API_KEY_USERS__ROOT": "default-api-key"},
            "auth.api_key_users must not use default value 'default-api-key'",
        ),
        (
            {"CALLFS_AUTH__INTERNAL_PROXY_SECRET": "k" * 16},
            "auth.internal_proxy_secret must not be reused as an API key",
        ),
        (
            {"CALLFS_AUTH__INTERNAL_PROXY_SECRET": "change-me-internal-secret"},
            "auth.internal_proxy_secret must be set and not use default value",
        ),
        (
            {"CALLFS_AUTH__SINGLE_USE_LINK_SECRET": ""},
            "auth.single_use_link_secret must be set and not use default value",
        ),
        (
            {"CALLFS_ERASURE__DATA_SHARDS": "200", "CALLFS_ERASURE__PARITY_SHARDS": "57"},
            "erasure.data_shards + erasure.parity_shards must not exceed 256",
        ),
        (
            {"CALLFS_BACKEND__DEFAULT_BACKEND": "tape"},
            'backend.default_backend must be one of: localfs, s3 (got "tape")',
        ),
    ],
)
def test_validation_messages(tmp_path: Path, env: dict[str, str], message: str) -> None:
    assert failure(tmp_path, env) == f"config validation failed: {message}"


def test_first_failure_wins(tmp_path: Path) -> None:
    env = {
        "CALLFS_DLM__TYPE": "etcd",
        "CALLFS_SERVER__LISTEN_ADDR": "",
        "CALLFS_AUTH__API_KEYS": "",
    }
    assert failure(tmp_path, env) == "config validation failed: server.listen_addr is required"


def test_derived_values(tmp_path: Path) -> None:
    cfg = load(tmp_path, {"CALLFS_METADATA_STORE__TYPE": "RAFT", "CALLFS_ERASURE__ENABLED": "true"})
    assert cfg.metadata_store.type == "raft" and cfg.raft.enabled is True
    assert (cfg.erasure.data_shards, cfg.erasure.parity_shards) == (4, 2)
    assert load(tmp_path, {"CALLFS_SERVER__PROTOCOL": ""}).server.protocol == "https"


def test_dev_profile(tmp_path: Path) -> None:
    cfg = load_config(None, dev=True, env={}, cwd=tmp_path)
    creds = tmp_path / "callfs-data" / "dev-credentials.yaml"
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    saved = yaml.safe_load(creds.read_text())["auth"]
    assert list(cfg.auth.api_keys) == saved["api_keys"]
    assert len(saved["api_keys"][0]) == 43 and "=" not in saved["api_keys"][0]
    assert cfg.server.protocol == "http" and cfg.server.listen_addr == "127.0.0.1:8443"
    assert cfg.metadata_store.type == "sqlite" and cfg.dlm.type == "local"
    assert cfg.metrics.listen_addr == ""
    again = load_config(None, dev=True, env={"CALLFS_SERVER__LISTEN_ADDR": ":1"}, cwd=tmp_path)
    assert again.auth.api_keys == cfg.auth.api_keys
    assert again.server.listen_addr == ":1"
    # a damaged file is neither overwritten (it holds the key scripts use) nor quoted (secrets)
    creds.write_text('auth:\n  api_keys: ["KEEP-ME\n')
    with pytest.raises(ConfigError, match=r"dev-credentials.yaml is not valid YAML: .*line 3") as e:
        load_config(None, dev=True, env={}, cwd=tmp_path)
    assert "KEEP-ME" not in str(e.value) and "KEEP-ME" in creds.read_text()
    for damaged in ("auth:\n  api_key: [KEEP-ME]\n", "- KEEP-ME\n", "auth:\n  api_keys: []\n"):
        creds.write_text(damaged)
        with pytest.raises(ConfigError, match=r"dev-credentials.yaml has no auth.api_keys; fix"):
            load_config(None, dev=True, env={}, cwd=tmp_path)
        assert creds.read_text() == damaged
    creds.write_bytes(b"auth:\n  api_keys: [\xff\xfe]\n")
    with pytest.raises(ConfigError, match=r"dev-credentials.yaml is not valid YAML"):
        load_config(None, dev=True, env={}, cwd=tmp_path)
    creds.write_text("")  # empty: made again
    assert load_config(None, dev=True, env={}, cwd=tmp_path).auth.api_keys


def test_full_example_names_every_key() -> None:
    data = yaml.safe_load((REPO / "examples" / "config" / "full.yaml").read_text())
    named = {f"{section}.{k}" for section, values in data.items() for k in values}
    assert named == {dotted for dotted, _ in all_keys()}
    cfg = load_config(str(REPO / "examples" / "config" / "single-node.yaml"), env={}, cwd=REPO)
    assert cfg.metadata_store.type == "sqlite"


def test_docs_name_every_key() -> None:
    text = (REPO / "docs" / "configuration.md").read_text()
    missing = [dotted for dotted, _ in all_keys() if f"`{dotted}`" not in text]
    assert missing == []


@pytest.mark.parametrize(
    "name", sorted(p.name for p in (REPO / "examples" / "config").glob("*.yaml"))
)
def test_examples_have_no_unknown_keys_or_unitless_durations(name: str) -> None:
    from callfs.config.loader import build_report

    raw = yaml.safe_load((REPO / "examples" / "config" / name).read_text())
    assert build_report(raw).warnings == ()
