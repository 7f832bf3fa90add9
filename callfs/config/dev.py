"""The ``callfs server --dev`` profile (API.md §20.2): no config needed, credentials made once."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import yaml

from callfs.config.syntax import syntax_error
from callfs.errors import ConfigError

CREDENTIALS = "dev-credentials.yaml"
DEV_LISTEN_ADDR = "127.0.0.1:8443"


def _token() -> str:
    return secrets.token_urlsafe(32)  # 32 random bytes, URL-safe base64 without padding


def ensure_credentials(data_dir: Path) -> dict[str, Any]:
    """Create ``<data_dir>/dev-credentials.yaml`` (mode 0600) on first use; reuse it later."""
    path = data_dir / CREDENTIALS
    if path.is_file():
        # Never overwritten: it may hold the key scripts use; the person decides.
        fix = "fix it, or delete it to make new dev credentials"
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, ValueError) as exc:  # ValueError: not UTF-8
            raise ConfigError(f"{path} is not valid YAML: {syntax_error(exc)}; {fix}") from None
        auth = loaded.get("auth") if isinstance(loaded, dict) else None
        if isinstance(auth, dict) and auth.get("api_keys"):
            return {"auth": auth}
        if loaded is not None:
            raise ConfigError(f"{path} has no auth.api_keys; {fix}")
    data_dir.mkdir(parents=True, exist_ok=True)
    auth = {
        "api_keys": [_token()],
        "internal_proxy_secret": _token(),
        "single_use_link_secret": _token(),
    }
    body = yaml.safe_dump({"auth": auth}, default_flow_style=False, sort_keys=False)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return {"auth": auth}


def dev_profile(data_dir: Path) -> dict[str, Any]:
    """The dev layer: between the built-in defaults and the config file (§18)."""
    layer: dict[str, Any] = {
        # No external_url: ``callfs server --dev`` derives it from the listener actually used
        # (``daemon.resolve_external_url``), so ``--listen`` or CALLFS_SERVER__LISTEN_ADDR
        # change both; http://127.0.0.1:8443 by default.
        "server": {"protocol": "http", "listen_addr": DEV_LISTEN_ADDR},
        "metrics": {"listen_addr": ""},
        "metadata_store": {
            "type": "sqlite",
            "sqlite_path": "./callfs-data/metadata.sqlite3",
        },
        "backend": {"localfs_root_path": "./callfs-data/files"},
        "dlm": {"type": "local"},
    }
    layer.update(ensure_credentials(data_dir))
    return layer
