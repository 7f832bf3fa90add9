"""Load a ``Config`` from layers (API.md §18): defaults -> dev profile -> file -> ``CALLFS_*``
environment, then validate. Every error is a ``ConfigError`` with the contract's wording."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from callfs.config.dev import dev_profile
from callfs.config.schema import DURATION, Config, section_classes
from callfs.config.validate import validate
from callfs.errors import ConfigError

ENV_PREFIX = "CALLFS_"
SEARCH = ("config.yaml", "config.yml", "config.json")
_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_FALSE = {"0", "f", "F", "FALSE", "false", "False"}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def parse_duration(value: Any) -> float:
    """Go-style durations (``300ms``, ``1m30s``, ``-2h``); a bare integer means nanoseconds."""
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}")
    if isinstance(value, int | float):
        return float(value) * 1e-9
    text = str(value).strip()
    if re.fullmatch(r"[-+]?\d+", text):
        return int(text) * 1e-9
    sign = 1.0
    if text[:1] in "+-":
        sign = -1.0 if text[0] == "-" else 1.0
        text = text[1:]
    if text == "0":
        return 0.0
    pos, total = 0, 0.0
    while pos < len(text):
        m = _DURATION_PART.match(text, pos)
        if m is None:
            raise ValueError(f"invalid duration {value!r}")
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if not text:
        raise ValueError(f"invalid duration {value!r}")
    return sign * total


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value != 0
    text = str(value).strip()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"invalid boolean {value!r}")


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"invalid integer {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return int(str(value).strip())


def _to_str(value: Any) -> str:
    if isinstance(value, dict | list):
        raise ValueError(f"expected a string, got {type(value).__name__}")
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def convert(value: Any, annotation: str, kind: str) -> Any:
    if kind == DURATION:
        return parse_duration(value)
    if annotation == "bool":
        return _to_bool(value)
    if annotation == "int":
        return _to_int(value)
    if annotation == "str":
        return _to_str(value)
    if annotation.startswith("tuple"):
        if value is None:
            return ()
        if isinstance(value, str):
            return tuple(p.strip() for p in value.split(",") if p.strip())
        if isinstance(value, list | tuple):
            return tuple(_to_str(v) for v in value)
        raise ValueError(f"expected a list, got {type(value).__name__}")
    if annotation.startswith("Mapping"):
        if value is None:
            return MappingProxyType({})
        if not isinstance(value, dict):
            raise ValueError(f"expected a map, got {type(value).__name__}")
        return MappingProxyType({str(k): _to_str(v) for k, v in value.items()})
    raise ValueError(f"unsupported type {annotation}")


def merge(base: dict[str, Any], layer: Mapping[str, Any]) -> dict[str, Any]:
    """Nested maps merge; a list or scalar replaces what is below it."""
    out = dict(base)
    for k, v in layer.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


def env_layer(env: Mapping[str, str]) -> dict[str, Any]:
    """``CALLFS_SERVER__LISTEN_ADDR=:9999`` -> ``{"server": {"listen_addr": ":9999"}}``."""
    layer: dict[str, Any] = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        parts = name[len(ENV_PREFIX) :].lower().split("__")
        if len(parts) < 2 or not all(parts):
            continue
        node = layer
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[parts[-1]] = value
    return layer


def read_file(path: Path, explicit: bool, shown: str | None = None) -> dict[str, Any]:
    """Parse one config file; errors quote ``shown`` (the path as the user gave it)."""
    name = shown or str(path)
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        if explicit:
            raise ConfigError(
                f"specified config file {name} not found: {exc.strerror or exc}"
            ) from exc
        return {}
    except OSError as exc:
        raise ConfigError(f"failed to load config file {name}: {exc.strerror or exc}") from exc
    try:
        if suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(
                f'failed to load config file {name}: unsupported config type "{suffix[1:]}"'
            )
    except (yaml.YAMLError, ValueError) as exc:
        raise ConfigError(f"failed to load config file {name}: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"failed to load config file {name}: the top level must be a map")
    return data


def build(raw: Mapping[str, Any]) -> Config:
    """Typed config from merged raw layers; unknown keys are ignored."""
    sections: dict[str, Any] = {}
    for section, cls in section_classes().items():
        values = raw.get(section) or {}
        if not isinstance(values, Mapping):
            raise ConfigError(f"failed to unmarshal config: {section}: expected a map")
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in values:
                continue
            try:
                kwargs[f.name] = convert(values[f.name], str(f.type), f.metadata.get("kind", ""))
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"failed to unmarshal config: {section}.{f.name}: {exc}") from exc
        sections[section] = cls(**kwargs)
    cfg = Config(**sections)
    return normalise(cfg)


def normalise(cfg: Config) -> Config:
    """Derived values: lower-cased enums, raft forced on, erasure defaults (§19)."""
    server = dataclasses.replace(
        cfg.server, protocol=cfg.server.protocol.strip().lower() or "https"
    )
    meta = dataclasses.replace(
        cfg.metadata_store, type=cfg.metadata_store.type.strip().lower() or "postgres"
    )
    dlm = dataclasses.replace(cfg.dlm, type=cfg.dlm.type.strip().lower() or "redis")
    raft = cfg.raft
    if meta.type == "raft" and not raft.enabled:
        raft = dataclasses.replace(raft, enabled=True)
    erasure = cfg.erasure
    if erasure.enabled:
        erasure = dataclasses.replace(
            erasure,
            data_shards=erasure.data_shards if erasure.data_shards >= 2 else 4,
            parity_shards=erasure.parity_shards if erasure.parity_shards >= 1 else 2,
        )
    return dataclasses.replace(
        cfg, server=server, metadata_store=meta, dlm=dlm, raft=raft, erasure=erasure
    )


def load_config(
    path: str | None = None,
    *,
    dev: bool = False,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Config:
    """Load, merge and validate (§18). ``dev`` adds the ``server --dev`` profile (§20.2)."""
    cwd = cwd or Path.cwd()
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    if dev:
        raw = merge(raw, dev_profile(cwd / "callfs-data"))
    if path:
        file_path = Path(path)
        if not file_path.is_absolute():
            file_path = cwd / file_path
        raw = merge(raw, read_file(file_path, explicit=True, shown=path))
    else:
        for name in SEARCH:
            candidate = cwd / name
            if candidate.is_file():
                raw = merge(raw, read_file(candidate, explicit=False))
                break
    raw = merge(raw, env_layer(env))
    cfg = build(raw)
    problem = validate(cfg)
    if problem is not None:
        raise ConfigError(f"config validation failed: {problem}")
    return cfg
