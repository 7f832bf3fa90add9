"""Load a ``Config`` from layers (API.md §18): defaults -> dev profile -> file -> ``CALLFS_*``
environment, then validate. Every error is a ``ConfigError`` with the contract's wording."""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from callfs.config.dev import dev_profile
from callfs.config.schema import DURATION, Config, all_keys, section_classes
from callfs.config.syntax import syntax_error
from callfs.config.validate import cautions, problems
from callfs.errors import ConfigError

log = logging.getLogger(__name__)

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


class _ConfigYamlLoader(yaml.SafeLoader):
    """``yaml.safe_load`` with YAML 1.2's booleans: only true/True/TRUE/false/False/FALSE.
    YAML 1.1 also reads unquoted yes/no/on/off (y/n too) as booleans, which turned such a secret
    into the string "true" and a user ID ``on:`` into "True"; they stay the text written (and,
    for a boolean key, are refused as §18 refuses them from the environment)."""


_ConfigYamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_ConfigYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)


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
            data = yaml.load(text, Loader=_ConfigYamlLoader)  # noqa: S506 - a SafeLoader
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(
                f'failed to load config file {name}: unsupported config type "{suffix[1:]}"'
            )
    except (yaml.YAMLError, ValueError) as exc:
        raise ConfigError(f"failed to load config file {name}: {syntax_error(exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"failed to load config file {name}: the top level must be a map")
    return data


class ConfigProblems(ConfigError):
    """Loading or validation failed, maybe for several reasons at once.

    ``message`` is the contract's error (API.md §18/§19: ``config validation failed: <first
    failure in the contract's order>``, or ``failed to unmarshal config: ...``); ``problems`` holds
    every failure in order and ``warnings`` what was accepted but looks wrong; ``str()`` and
    ``details`` give the message followed by the rest, one per line."""

    def __init__(self, prefix: str, found: list[str], warnings: list[str]) -> None:
        super().__init__(f"{prefix}{found[0]}")
        self.problems = list(found)
        self.warnings = list(warnings)
        rest = [*found[1:], *(f"warning: {w}" for w in warnings)]
        self.details = "\n".join([self.message, *(f"  - {line}" for line in rest)])

    def __str__(self) -> str:
        return self.details


@dataclass(frozen=True)
class Loaded:
    """A valid configuration and what was accepted but looks like a mistake."""

    config: Config
    warnings: tuple[str, ...] = ()


#: §17: any other ``log.level`` means info.
LOG_LEVELS = ("debug", "info", "warn", "error")
#: A bare duration below this many nanoseconds (1 ms) is surely a missing unit.
_BARE_DURATION_SUSPECT = 1_000_000


def _nearest(word: str, choices: list[str]) -> str | None:
    found = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return found[0] if found else None


def unknown_keys(raw: Mapping[str, Any]) -> list[str]:
    """Keys no section declares (API.md §18 ignores them): name each and the nearest known one."""
    classes = section_classes()
    dotted_all = [dotted for dotted, _ in all_keys()]
    out: list[str] = []
    for section, values in raw.items():
        name = str(section)
        cls = classes.get(name)
        if cls is None:
            guess = _nearest(name, list(classes)) or _nearest(
                name, [d.split(".", 1)[1] for d in dotted_all]
            )
            if guess is not None and guess not in classes:
                guess = next(d for d in dotted_all if d.split(".", 1)[1] == guess)
            out.append(_unknown(name, "section", guess))
            continue
        if not isinstance(values, Mapping):
            continue
        known = [f.name for f in dataclasses.fields(cls)]
        for k in values:
            if str(k) in known:
                continue
            dotted = f"{name}.{k}"
            guess = _nearest(dotted, dotted_all)
            out.append(_unknown(dotted, "key", guess))
    return out


def _unknown(dotted: str, what: str, guess: str | None) -> str:
    hint = f"did you mean {guess}?" if guess else "docs/configuration.md lists every key"
    return f"unknown {what} {dotted} is ignored; {hint}"


def _bare_duration(dotted: str, value: Any) -> str | None:
    """A duration written without a unit (§18: a bare integer means nanoseconds)."""
    if isinstance(value, bool):
        return None
    numeric = isinstance(value, int | float)
    if not numeric and not (isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d+\s*", value)):
        return None
    number = float(value)
    if number == 0 or abs(number) >= _BARE_DURATION_SUSPECT:
        return None
    shown = int(number) if number.is_integer() else number
    return (
        f"{dotted}: {shown} has no unit, so it means {shown}ns (a bare number is nanoseconds); "
        f'write "{shown}s" for seconds or "{shown}ms" for milliseconds'
    )


def build_report(raw: Mapping[str, Any]) -> Loaded:
    """Typed config from merged raw layers, plus warnings for what the contract accepts but is
    surely a mistake (unknown keys, unitless durations, unknown log levels). Every value that
    cannot be converted is reported at once."""
    sections: dict[str, Any] = {}
    errors: list[str] = []
    warnings = unknown_keys(raw)
    for section, cls in section_classes().items():
        values = raw.get(section) or {}
        if not isinstance(values, Mapping):
            errors.append(f"{section}: expected a map")
            continue
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in values:
                continue
            kind = f.metadata.get("kind", "")
            try:
                kwargs[f.name] = convert(values[f.name], str(f.type), kind)
            except (ValueError, TypeError) as exc:
                errors.append(f"{section}.{f.name}: {exc}")
                continue
            if kind == DURATION:
                suspect = _bare_duration(f"{section}.{f.name}", values[f.name])
                if suspect is not None:
                    warnings.append(suspect)
        if not errors:
            sections[section] = cls(**kwargs)
    if errors:
        raise ConfigProblems("failed to unmarshal config: ", errors, warnings)
    cfg = normalise(Config(**sections))
    level = cfg.log.level
    if level.lower() not in LOG_LEVELS:
        guess = _nearest(level.lower(), list(LOG_LEVELS))
        hint = f'; did you mean "{guess}"?' if guess else ""
        warnings.append(
            f'log.level "{level}" is not one of: {", ".join(LOG_LEVELS)}, so it means info{hint}'
        )
    warnings.extend(cautions(cfg))
    r = cfg.raft
    others = {a for n, a in r.peers.items() if n != r.node_id and a != r.bind_addr}
    if cfg.metadata_store.type == "raft" and not r.bootstrap and not others:
        # the server refuses to start such a node: say so at ``config validate`` already
        warnings.append(
            "raft.peers is empty and raft.bootstrap is false: the server will refuse to "
            "start; list the current members in raft.peers (then run callfs cluster join)"
        )
    return Loaded(cfg, tuple(warnings))


def build(raw: Mapping[str, Any]) -> Config:
    """Typed config from merged raw layers; unknown keys are ignored (``build_report`` names
    them)."""
    return build_report(raw).config


def normalise(cfg: Config) -> Config:
    """Derived values: lower-cased enums, raft forced on, erasure defaults (§19)."""
    server = dataclasses.replace(
        cfg.server,
        protocol=cfg.server.protocol.strip().lower() or "https",
        # v1's meaning (Go's http.Server): zero or less is no limit on a stall
        read_timeout=_stall_limit(cfg.server.read_timeout),
        write_timeout=_stall_limit(cfg.server.write_timeout),
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


#: What ``server.read_timeout``/``write_timeout`` of 0 or less become: no limit in practice (a
#: day; a finite number keeps the timers and TCP_USER_TIMEOUT, in milliseconds, in range).
NO_STALL_LIMIT = 86400.0


def _stall_limit(seconds: float) -> float:
    return NO_STALL_LIMIT if seconds <= 0 else seconds


def load_config(
    path: str | None = None,
    *,
    dev: bool = False,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Config:
    """Load, merge and validate (§18). ``dev`` adds the ``server --dev`` profile (§20.2).
    Warnings (``load_config_report``) are logged."""
    loaded = load_config_report(path, dev=dev, env=env, cwd=cwd)
    for warning in loaded.warnings:
        log.warning("config: %s", warning)
    return loaded.config


def load_config_report(
    path: str | None = None,
    *,
    dev: bool = False,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Loaded:
    """``load_config`` that returns its warnings instead of logging them. A failure raises
    ``ConfigProblems`` (a ``ConfigError``) listing every problem."""
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
    loaded = build_report(raw)
    found = problems(loaded.config)
    if found:
        raise ConfigProblems("config validation failed: ", found, list(loaded.warnings))
    return loaded
