"""What an operator installs (issue 15): example configs, the Dockerfile, the compose files, the
systemd template, the Prometheus rules and the Grafana dashboard, checked against the real code.

The metric check starts a real node (Raft and erasure coding on), scrapes its /metrics and
requires every metric name an alert rule or a dashboard panel uses to be one the node exports;
node_exporter names are allowed only where the rule or panel says ``metrics_from: node_exporter``.
"""

from __future__ import annotations

import asyncio
import copy
import importlib.resources
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import pytest
import yaml

from callfs.config import load_config
from callfs.config.loader import build_report, load_config_report, read_file

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
EXAMPLES = sorted((ROOT / "examples" / "config").glob("*.y*ml"))
DEPLOY_CONFIGS = sorted((DEPLOY / "configs").glob("*.yaml"))
COMPOSE_FILES = [DEPLOY / "compose.yaml", DEPLOY / "compose.postgres.yaml"]
#: full.yaml lists every key at its built-in default, and the defaults are refused on purpose
#: (placeholder secrets, no API key): it must parse, and nothing else.
REFERENCE_ONLY = {"full.yaml"}
NO_ENV: dict[str, str] = {}


def _bin(name: str) -> str:
    """A tool of the dev extra, from this interpreter's environment (never skipped)."""
    found = Path(sys.executable).parent / name
    if found.exists():
        return str(found)
    which = shutil.which(name)
    assert which, f"{name} is missing: pip install -e '.[dev]'"
    return which


# ---- example configs ---------------------------------------------------------------------------


def test_the_examples_issue_15_asks_for_exist() -> None:
    names = {p.name for p in EXAMPLES}
    for wanted in (
        "raft-node-1.yaml",
        "raft-node-2.yaml",
        "raft-node-3.yaml",
        "postgres-redis-node-1.yaml",
        "postgres-redis-node-2.yaml",
        "s3-tier.yaml",
        "erasure-node-1.yaml",
        "erasure-node-2.yaml",
        "erasure-node-3.yaml",
        "tls.yaml",
    ):
        assert wanted in names


@pytest.mark.parametrize("path", EXAMPLES + DEPLOY_CONFIGS, ids=lambda p: p.name)
def test_every_example_loads_and_validates(path: Path) -> None:
    if path.name in REFERENCE_ONLY:
        loaded = build_report(read_file(path, explicit=True))
        assert loaded.warnings == ()
        return
    cfg = load_config(str(path), env=NO_ENV)
    assert cfg.instance_discovery.instance_id
    # nothing accepted-but-suspicious either: no unknown keys, no unitless durations
    assert load_config_report(str(path), env=NO_ENV).warnings == ()


@pytest.mark.parametrize(
    "path", [p for p in EXAMPLES + DEPLOY_CONFIGS if "node-" in p.name], ids=lambda p: p.name
)
def test_cluster_examples_agree_with_their_siblings(path: Path) -> None:
    cfg = load_config(str(path), env=NO_ENV)
    siblings = [p for p in path.parent.glob(re.sub(r"\d+\.yaml$", "*.yaml", path.name))]
    assert len(siblings) >= 2
    for other in siblings:
        o = load_config(str(other), env=NO_ENV)
        assert o.auth.internal_proxy_secret == cfg.auth.internal_proxy_secret
        assert o.auth.single_use_link_secret == cfg.auth.single_use_link_secret
        assert o.metadata_store.type == cfg.metadata_store.type
        assert o.erasure == cfg.erasure
    if cfg.metadata_store.type == "raft":
        assert cfg.raft.node_id == cfg.instance_discovery.instance_id
        assert cfg.raft.peers[cfg.raft.node_id] == cfg.raft.bind_addr  # the Raft identity
        bootstraps = [p for p in siblings if load_config(str(p), env=NO_ENV).raft.bootstrap]
        assert len(bootstraps) == 1
    else:
        assert cfg.dlm.type == "redis"  # locks shared between nodes
        assert cfg.instance_discovery.instance_id not in cfg.instance_discovery.peer_endpoints


def test_compose_environment_overrides_validate() -> None:
    """What compose.postgres.yaml sets through CALLFS_ variables is accepted on top of the file."""
    env = {
        "CALLFS_AUTH__INTERNAL_PROXY_SECRET": "another-internal-secret-0123456789",
        "CALLFS_AUTH__SINGLE_USE_LINK_SECRET": "another-link-secret-0123456789",
        "CALLFS_METADATA_STORE__DSN": "postgres://callfs:pw@postgres:5432/callfs?sslmode=disable",
    }
    cfg = load_config(str(DEPLOY / "configs" / "pg-node-1.yaml"), env=env)
    assert cfg.auth.internal_proxy_secret == env["CALLFS_AUTH__INTERNAL_PROXY_SECRET"]
    assert cfg.metadata_store.dsn == env["CALLFS_METADATA_STORE__DSN"]


def test_env_only_config_of_docs_deploy_validates() -> None:
    """docs/deploy.md runs the image with CALLFS_ variables only (no file): those are enough."""
    text = (ROOT / "docs" / "deploy.md").read_text()
    block = text.split("<!-- env-only -->", 2)[1]
    env = dict(re.findall(r"-e (CALLFS_[A-Z_]+)=(\S+)", block))
    assert len(env) >= 6
    cfg = load_config(None, env=env, cwd=ROOT / "deploy")  # no config.yaml there
    assert cfg.metadata_store.sqlite_path.startswith("/var/lib/callfs/data/")
    assert cfg.backend.localfs_root_path.startswith("/var/lib/callfs/data/")


# ---- Dockerfile and compose --------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    dockerfile = DEPLOY / "Dockerfile"
    run = subprocess.run(
        [_bin("hadolint"), "--no-color", str(dockerfile)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout + run.stderr
    text = dockerfile.read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2  # multi-stage
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n.*healthcheck\.py", text, re.M)
    assert "/var/lib/callfs/data" in text and "/var/lib/callfs/raft" in text
    assert re.search(r"^VOLUME ", text, re.M)
    assert re.search(r"^STOPSIGNAL SIGTERM", text, re.M)
    # what the image copies exists
    for src in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for part in src.split():
            assert (ROOT / part).exists(), part


def test_hadolint_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN cd /tmp && pip install foo\n")
    run = subprocess.run([_bin("hadolint"), "--no-color", str(bad)], capture_output=True)
    assert run.returncode != 0


def _compose_schema() -> dict[str, Any]:
    # check-jsonschema (dev extra) vendors the compose-spec schema; the CLI in .ci/run uses it too
    vendor = importlib.resources.files("check_jsonschema") / "builtin_schemas" / "vendor"
    schema: dict[str, Any] = json.loads((vendor / "compose-spec.json").read_text("utf-8"))
    return schema


def _compose_errors(doc: Any) -> list[str]:
    validator = jsonschema.Draft202012Validator(_compose_schema())
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_file_matches_the_compose_spec(path: Path) -> None:
    doc = yaml.safe_load(path.read_text())
    assert _compose_errors(doc) == []
    nodes = {n: s for n, s in doc["services"].items() if "callfs" in str(s.get("image", ""))}
    assert len(nodes) == 3
    for name, service in nodes.items():
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        assert service["stop_grace_period"] == "40s"
        mounts = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
        config = (path.parent / mounts["/etc/callfs/config.yaml"]).resolve()
        assert config.is_file(), config
        cfg = load_config(str(config), env=NO_ENV)
        assert cfg.instance_discovery.instance_id == name == service["hostname"]
        assert "/var/lib/callfs/data" in mounts
        assert cfg.backend.localfs_root_path.startswith("/var/lib/callfs/data/")
        if cfg.metadata_store.type == "raft":
            assert "/var/lib/callfs/raft" in mounts
            assert cfg.raft.data_dir.startswith("/var/lib/callfs/raft")
        for named in (src for src in mounts.values() if not src.startswith(".")):
            assert named in doc["volumes"]


def test_compose_schema_check_can_fail() -> None:
    doc = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    broken = copy.deepcopy(doc)
    broken["services"]["node-1"]["restart_policy"] = "always"  # not a compose key
    assert _compose_errors(broken)
    broken = copy.deepcopy(doc)
    broken["services"]["node-1"]["ports"] = "8441:8443"  # must be a list
    assert _compose_errors(broken)


def test_systemd_template_runs_one_node_per_instance() -> None:
    unit = (DEPLOY / "callfs@.service").read_text()
    assert "ExecStart=/usr/local/bin/callfs server -c /etc/callfs/%i.yaml" in unit
    assert "StateDirectory=callfs/%i" in unit and "ReadWritePaths=/var/lib/callfs/%i" in unit
    assert "callfs cluster join" in unit
    timeout = int(re.search(r"^TimeoutStopSec=(\d+)", unit, re.M).group(1))  # type: ignore[union-attr]
    assert timeout > 30  # the daemon's graceful stop


# ---- metrics: alerts and dashboard against a real node ------------------------------------------

#: PromQL words that are not metric names (functions, aggregations, operators, modifiers).
PROMQL_WORDS = {
    "abs", "absent", "and", "avg", "avg_over_time", "by", "ceil", "changes", "clamp_min",
    "count", "delta", "deriv", "group_left", "group_right", "histogram_quantile", "idelta",
    "ignoring", "increase", "irate", "label_replace", "max", "max_over_time", "min",
    "min_over_time", "offset", "on", "or", "predict_linear", "rate", "resets", "round",
    "sum", "time", "topk", "unless", "vector", "without", "bool",
}  # fmt: skip
#: Series Prometheus makes itself for every target.
PROMETHEUS_SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
NODE_EXPORTER_MARK = "metrics_from: node_exporter"


def metric_names(expr: str) -> set[str]:
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values
    s = re.sub(r"\{[^}]*\}", "", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", "", s)  # range selectors
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", s)
    tokens = set(re.findall(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", s))
    return tokens - PROMQL_WORDS


def test_metric_names_parser() -> None:
    expr = (
        'sum by (instance) (rate(callfs_http_requests_total{status_code=~"5.."}[5m])) / '
        "histogram_quantile(0.95, sum by (le) (rate(x_bucket[1m]))) > 0.05 and up == 0"
    )
    assert metric_names(expr) == {"callfs_http_requests_total", "x_bucket", "up"}


def _alert_uses() -> list[tuple[str, str, bool]]:
    doc = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    out = []
    for group in doc["groups"]:
        for rule in group["rules"]:
            assert {"alert", "expr", "for", "labels", "annotations"} <= set(rule), rule
            assert rule["labels"]["severity"] in ("critical", "warning")
            assert rule["annotations"]["summary"]
            marked = rule["labels"].get("metrics_from") == "node_exporter"
            out.extend((rule["alert"], name, marked) for name in metric_names(rule["expr"]))
    return out


def _panel_uses() -> list[tuple[str, str, bool]]:
    doc = json.loads((DEPLOY / "grafana" / "callfs-dashboard.json").read_text())
    out = []
    for panel in doc["panels"]:
        marked = NODE_EXPORTER_MARK in panel.get("description", "")
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            out.extend((panel["title"], n, marked) for n in metric_names(target["expr"]))
    return out


def test_alerts_cover_what_issue_15_asks() -> None:
    used = {name for _, name, _ in _alert_uses()}
    for name in (
        "up",  # node down
        "callfs_raft_has_leader",
        "callfs_replication_backlog",
        "callfs_erasure_files_degraded",
        "callfs_http_requests_total",  # 5xx rate
        "node_filesystem_avail_bytes",  # disk almost full (node_exporter)
    ):
        assert name in used, name
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert scrape["rule_files"] == ["/etc/prometheus/alerts.yml"]
    jobs = {job["job_name"]: job for job in scrape["scrape_configs"]}
    targets = jobs["callfs"]["static_configs"][0]["targets"]
    assert targets == [f"node-{i}:9090" for i in (1, 2, 3)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _exported_names(text: str) -> set[str]:
    names: set[str] = set()
    for line in text.splitlines():
        m = re.match(r"# TYPE (\S+) (\w+)", line)
        if m:
            name, kind = m.groups()
            names.add(name)
            if kind in ("histogram", "summary"):
                names.update(f"{name}{s}" for s in ("_bucket", "_sum", "_count", "_created"))
            if kind == "counter":
                names.update({name, f"{name}_total", f"{name}_created"})
        elif line and not line.startswith("#"):
            names.add(re.match(r"[^{\s]+", line).group(0))  # type: ignore[union-attr]
    return names


@pytest.mark.slow
async def test_alerts_and_dashboard_name_only_exported_metrics(tmp_path: Path) -> None:
    api, metrics, raft = _free_port(), _free_port(), _free_port()
    base = f"http://127.0.0.1:{api}"
    cfg = {
        "server": {"protocol": "http", "listen_addr": f"127.0.0.1:{api}", "external_url": base},
        "metrics": {"listen_addr": f"127.0.0.1:{metrics}"},
        "log": {"level": "info", "format": "console"},
        "auth": {
            "api_key_users": {"alice": "shipping-test-alice-key-0123"},
            "internal_proxy_secret": "shipping-test-internal-secret-0123",
            "single_use_link_secret": "shipping-test-link-secret-0123",
        },
        "metadata_store": {"type": "raft"},
        "raft": {
            "bootstrap": True,
            "node_id": "node-1",
            "bind_addr": f"127.0.0.1:{raft}",
            "data_dir": str(tmp_path / "raft"),
            "peers": {"node-1": f"127.0.0.1:{raft}"},
        },
        "dlm": {"type": "local"},
        "backend": {"localfs_root_path": str(tmp_path / "files")},
        "instance_discovery": {"instance_id": "node-1"},
        "erasure": {"enabled": True, "data_shards": 2, "parity_shards": 1},
        "ha": {"replication_enabled": True, "replica_backend": "localfs"},
    }
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLFS_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "callfs", "server", "-c", str(path)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    key = {"Authorization": "Bearer shipping-test-alice-key-0123"}
    try:
        async with aiohttp.ClientSession() as s:
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, "the node exited at start"
                try:
                    async with s.get(f"{base}/health") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, "no /health in 60 s"
                await asyncio.sleep(0.2)
            # one write through Raft (erasure-coded: the one node holds all three shards)
            hdr = {**key, "X-CallFS-Erasure": "true"}
            deadline = time.monotonic() + 30
            while True:
                async with s.post(f"{base}/v1/files/m/a.bin", data=b"x" * 1000, headers=hdr) as r:
                    if r.status == 201:
                        break
                    assert r.status == 503 and time.monotonic() < deadline, r.status
                await asyncio.sleep(0.2)
            async with s.get(f"{base}/v1/files/m/a.bin", headers=key) as r:
                assert r.status == 200 and await r.read() == b"x" * 1000
            async with s.get(f"http://127.0.0.1:{metrics}/metrics") as r:
                assert r.status == 200
                exported = _exported_names(await r.text())
        # the Docker HEALTHCHECK script against this node, and against nothing
        check = [sys.executable, str(DEPLOY / "healthcheck.py")]
        ok = subprocess.run(check, env={**env, "HEALTHCHECK_URL": f"{base}/health"})
        assert ok.returncode == 0
        down = f"http://127.0.0.1:{_free_port()}/health"
        bad = subprocess.run(check, env={**env, "HEALTHCHECK_URL": down}, capture_output=True)
        assert bad.returncode == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=40)  # graceful stop within the daemon's 30 s
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = None
        stderr = proc.stderr.read() if proc.stderr else ""
        if proc.stderr:
            proc.stderr.close()
    assert code == 0, stderr

    assert "callfs_raft_has_leader" in exported and "callfs_erasure_files_degraded" in exported
    unknown = []
    for where, name, marked in _alert_uses() + _panel_uses():
        if name in exported or name in PROMETHEUS_SYNTHETIC:
            continue
        if marked and name.startswith("node_"):
            continue
        unknown.append(f"{where}: {name}")
    assert unknown == [], "metrics no CallFS node exports: " + ", ".join(unknown)
