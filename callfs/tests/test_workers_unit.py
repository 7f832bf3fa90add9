"""``server.workers`` without processes: its validation, the routes a worker relays, the merge of
the processes' metrics, the trusted relay headers and the spec a worker is handed."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from callfs import workers
from callfs.api.relay import WAKE_PATH, relayed
from callfs.api.state import BRIDGE_CLIENT_HEADER, BRIDGE_TLS_HEADER, bridge_of, tls_of
from callfs.config.loader import ConfigProblems, load_config_report
from callfs.metrics import Metrics, merge_expositions
from callfs.workers import WorkerPool, WorkerSpec, _pickle

GOOD = {
    "CALLFS_AUTH__API_KEYS": "k" * 16,
    "CALLFS_AUTH__INTERNAL_PROXY_SECRET": "s" * 20,
    "CALLFS_AUTH__SINGLE_USE_LINK_SECRET": "l" * 20,
}


def load(tmp_path: Path, env: dict[str, str]) -> Any:
    return load_config_report(None, env={**GOOD, **env}, cwd=tmp_path)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CALLFS_SERVER__WORKERS": "0"}, "server.workers must be between 1 and 64 (got 0)"),
        ({"CALLFS_SERVER__WORKERS": "65"}, "server.workers must be between 1 and 64 (got 65)"),
        (
            {
                "CALLFS_SERVER__WORKERS": "2",
                "CALLFS_METADATA_STORE__TYPE": "raft",
            },
            "server.workers must be 1 when metadata_store.type=raft: a Raft node keeps one "
            "state machine in one process (docs/workers.md)",
        ),
    ],
)
def test_workers_validation(tmp_path: Path, env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigProblems) as info:
        load(tmp_path, env)
    assert info.value.message == f"config validation failed: {message}"


def test_workers_default_and_accepted_values(tmp_path: Path) -> None:
    assert load(tmp_path, {}).config.server.workers == 1
    sqlite = {"CALLFS_METADATA_STORE__TYPE": "sqlite", "CALLFS_SERVER__WORKERS": "4"}
    assert load(tmp_path, sqlite).config.server.workers == 4


@pytest.mark.parametrize(
    "route",
    [
        "/metrics",
        "/v1/status",
        "/v1/links/generate",
        "/download/{token}",
        "/v1/uploads",
        "/v1/uploads/{upload_id}",
        "/v1/internal/fsck",
        "/v1/internal/nodes/drain",
        "/v1/internal/blobs",
        "/v1/internal/blobs/{key}",
        "/v1/internal/erasure/repair",
    ],
)
def test_per_process_state_routes_are_relayed(route: str) -> None:
    assert relayed(route)


@pytest.mark.parametrize(
    "route",
    [
        None,  # no route: the worker answers 404 or 405 itself
        "/health",
        "/v1/files/{tail}",
        "/v1/files/ws/{tail}",
        "/v1/directories/{tail}",
        "/v1/shards/{tail}",
        "/v1/internal/shards/{tail}",
        "/openapi.json",
        "/ui/{name}",
    ],
)
def test_stateless_routes_are_served_by_every_worker(route: str | None) -> None:
    assert not relayed(route)


def test_the_worker_app_routes_escaped_paths_to_the_relay_decision(tmp_path: Path) -> None:
    """The decision follows the matched route: ``/v1/link%73/generate`` is relayed like
    ``/v1/links/generate``, and a worker has no route for the primary's wake-up call at all."""
    from callfs.daemon import Node

    cfg = load(
        tmp_path,
        {
            "CALLFS_METADATA_STORE__TYPE": "sqlite",
            "CALLFS_METADATA_STORE__SQLITE_PATH": str(tmp_path / "m.sqlite3"),
            "CALLFS_BACKEND__LOCALFS_ROOT_PATH": str(tmp_path / "files"),
            "CALLFS_SERVER__WORKERS": "2",
            "CALLFS_DLM__TYPE": "local",
        },
    ).config
    worker = Node(cfg, worker=WorkerSpec(cfg, 1, str(tmp_path), 8443)).build()
    primary = Node(cfg).build()

    async def route(app: web.Application, method: str, raw: str) -> str | None:
        request = make_mocked_request(method, raw, app=app)
        match = await app.router.resolve(request)
        resource = match.route.resource
        return None if resource is None else resource.canonical

    async def check() -> None:
        escaped = await route(worker, "POST", "/v1/link%73/generate")
        assert relayed(escaped)
        assert relayed(await route(worker, "GET", "/downloa%64/abc"))
        assert relayed(await route(worker, "PATCH", "/v1/upload%73/abc"))
        assert not relayed(await route(worker, "GET", "/v1/file%73/a"))
        assert await route(worker, "POST", "/v1/internal/workers/wak%65") is None
        assert await route(primary, "POST", "/v1/internal/workers/wak%65") == WAKE_PATH

    asyncio.run(check())


def _values(text: bytes) -> dict[str, float]:
    out = {}
    for line in text.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_merge_adds_samples_and_keeps_the_primary_process_figures() -> None:
    primary, worker = Metrics(), Metrics()
    primary.http_requests.labels("GET", "/health", "200").inc(3)
    worker.http_requests.labels("GET", "/health", "200").inc(2)
    worker.http_requests.labels("PUT", "/v1/files/*", "201").inc()
    primary.http_duration.labels("GET", "/health").observe(0.002)
    worker.http_duration.labels("GET", "/health").observe(0.2)
    merged = _values(merge_expositions(primary.exposition(), [worker.exposition()]))
    get = 'callfs_http_requests_total{method="GET",path="/health",status_code="200"}'
    put = 'callfs_http_requests_total{method="PUT",path="/v1/files/*",status_code="201"}'
    assert merged[get] == 5.0
    assert merged[put] == 1.0
    labels = 'method="GET",path="/health"'
    assert merged[f"callfs_http_request_duration_seconds_count{{{labels}}}"] == 2.0
    assert merged[f'callfs_http_request_duration_seconds_bucket{{le="0.005",{labels}}}'] == 1.0
    assert merged[f'callfs_http_request_duration_seconds_bucket{{le="+Inf",{labels}}}'] == 2.0
    assert merged["callfs_worker_processes"] == 2.0
    own = _values(primary.exposition())
    # one process's memory and start time, not a sum of them
    assert merged["process_start_time_seconds"] == own["process_start_time_seconds"]
    assert not [name for name in merged if "_created" in name]  # v1 had none (§16)
    buckets = [k for k in merged if k.startswith("callfs_http_request_duration_seconds_bucket")]
    # §16's "default buckets": v1's (client_golang DefBuckets), 11 and +Inf
    assert sorted(float(re.search(r'le="([^"]+)"', k).group(1)) for k in buckets) == [  # type: ignore[union-attr]
        0.005,
        0.01,
        0.025,
        0.05,
        0.1,
        0.25,
        0.5,
        1.0,
        2.5,
        5.0,
        10.0,
        float("inf"),
    ]


def test_worker_counters_never_go_backwards(tmp_path: Path) -> None:
    """A worker that misses a scrape counts as last seen (its gauges left out); one that died
    or was restarted leaves its last counters in the sums, under the new process's."""
    cfg = load(tmp_path, {"CALLFS_SERVER__WORKERS": "2"}).config
    pool = WorkerPool(cfg, str(tmp_path), 1, 1.0, Metrics())
    worker = Metrics()
    answers: list[bytes | None] = []

    class Proc:
        def __init__(self, pid: int) -> None:
            self.pid, self.returncode = pid, None

    async def scrape(index: int) -> bytes | None:
        return answers.pop(0)

    pool._scrape = scrape  # type: ignore[method-assign]  # the processes are not the point
    pool._procs = {1: Proc(100)}  # type: ignore[dict-item]
    key = 'callfs_http_requests_total{method="GET",path="/health",status_code="200"}'
    held = "callfs_active_locks"
    own = Metrics().exposition()

    def counted(text: bytes | None) -> tuple[float, float]:
        values = _values(asyncio.run(pool.exposition(own)) if text is None else text)
        return values.get(key, 0.0), values.get(held, 0.0)

    worker.http_requests.labels("GET", "/health", "200").inc(5)
    worker.active_locks.inc()
    answers.append(worker.exposition())
    assert counted(None) == (5.0, 1.0)
    answers.append(None)  # slow to answer: its counters as last seen, not its gauges
    assert counted(None) == (5.0, 0.0)
    pool._procs = {1: Proc(101)}  # type: ignore[dict-item]  # died; a new one counts from 0
    fresh = Metrics()
    fresh.http_requests.labels("GET", "/health", "200").inc(2)
    answers.append(fresh.exposition())
    assert counted(None) == (7.0, 0.0)
    answers.append(None)  # the new one slow to answer too
    assert counted(None) == (7.0, 0.0)
    pool._procs = {}  # type: ignore[dict-item]  # gone, not restarted (yet)
    assert counted(None) == (7.0, 0.0)


def test_two_scrapes_at_once_retire_a_dead_worker_once(tmp_path: Path) -> None:
    """Two scrapers at once (an HA Prometheus pair): one scrape's late result for a worker
    that died meanwhile was retired a second time by the next scrape (found by review)."""
    cfg = load(tmp_path, {"CALLFS_SERVER__WORKERS": "3"}).config
    pool = WorkerPool(cfg, str(tmp_path), 1, 1.0, Metrics())
    key = 'callfs_http_requests_total{method="GET",path="/health",status_code="200"}'

    class Proc:
        def __init__(self, pid: int) -> None:
            self.pid, self.returncode = pid, None

    def counted(n: int) -> bytes:
        m = Metrics()
        m.http_requests.labels("GET", "/health", "200").inc(n)
        return m.exposition()

    async def check() -> None:
        slow = asyncio.Event()
        answers = {1: counted(3)}

        async def scrape(index: int) -> bytes | None:
            if index == 2:
                await slow.wait()
                return counted(0)
            return answers[1]

        pool._scrape = scrape  # type: ignore[method-assign]
        pool._procs = {1: Proc(100), 2: Proc(200)}  # type: ignore[dict-item]
        slow.set()
        await pool.exposition(b"")  # worker 1 seen with 3
        slow.clear()
        answers[1] = counted(5)
        first = asyncio.ensure_future(pool.exposition(b""))  # waits on worker 2
        await asyncio.sleep(0.01)
        pool._procs = {1: Proc(101), 2: Proc(200)}  # type: ignore[dict-item]  # 100 died at 5
        answers[1] = counted(0)
        second = asyncio.ensure_future(pool.exposition(b""))
        await asyncio.sleep(0.01)
        slow.set()
        await first
        await second
        values = _values(await pool.exposition(b""))
        assert values[key] == 5.0

    asyncio.run(check())


def test_the_probe_leaves_a_starting_worker_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker still starting has no private socket yet: probed, it was killed after three
    misses, again at every restart (found by review). Only ready ones are probed."""
    monkeypatch.setattr(workers, "PROBE_EVERY", 0.01)
    cfg = load(tmp_path, {"CALLFS_SERVER__WORKERS": "2"}).config
    pool = WorkerPool(cfg, str(tmp_path), 1, 1.0, Metrics())
    killed: list[int] = []

    class Proc:
        def __init__(self, pid: int) -> None:
            self.pid, self.returncode = pid, None

        def kill(self) -> None:
            killed.append(self.pid)

    async def silent(index: int, path: str, within: float) -> bytes | None:
        return None  # no answer: not listening yet, or hung

    async def check() -> None:
        pool._ask = silent  # type: ignore[method-assign]
        pool._procs = {1: Proc(100)}  # type: ignore[dict-item]
        probe = asyncio.ensure_future(pool._probe(1))
        await asyncio.sleep(0.3)
        assert killed == []  # starting
        pool._ready[1] = 100  # signalled ready, then stopped answering
        await asyncio.sleep(0.3)
        probe.cancel()
        assert killed and set(killed) == {100}

    asyncio.run(check())


def test_merge_of_one_exposition_is_that_exposition() -> None:
    metrics = Metrics()
    metrics.http_requests.labels("GET", "/health", "200").inc()
    own = metrics.exposition()  # once: the process figures (CPU time, memory) move between calls
    assert merge_expositions(own, []) == own


def _request(sockname: object, headers: dict[str, str] | None = None) -> web.Request:
    class Transport:
        def get_extra_info(self, name: str, default: object = None) -> object:
            return {"sockname": sockname, "peername": ("10.0.0.9", 1234)}.get(name, default)

    return make_mocked_request("GET", "/v1/files/a", headers=headers, transport=Transport())


def test_relay_headers_are_trusted_on_the_worker_socket_only() -> None:
    from callfs.api.state import ApiState

    state: Any = ApiState.__new__(ApiState)
    state.h3_socket, state.worker_socket = "/tmp/x/h3.sock", "/tmp/x/primary.sock"
    claims = {BRIDGE_CLIENT_HEADER: "1.2.3.4", BRIDGE_TLS_HEADER: "1"}
    from_tcp = _request(("127.0.0.1", 8443), claims)
    assert bridge_of(state, from_tcp) is None
    assert tls_of(state, from_tcp) is False
    relayed_tls = _request("/tmp/x/primary.sock", claims)
    assert bridge_of(state, relayed_tls) == "worker"
    assert tls_of(state, relayed_tls) is True
    plain = _request("/tmp/x/primary.sock", {BRIDGE_CLIENT_HEADER: "1.2.3.4"})
    assert tls_of(state, plain) is False
    h3 = _request("/tmp/x/h3.sock", {BRIDGE_TLS_HEADER: "0"})
    assert bridge_of(state, h3) == "h3"
    assert tls_of(state, h3) is True  # HTTP/3 is always TLS, whatever a header says


def test_the_spec_round_trips_with_the_config_read_only_maps(tmp_path: Path) -> None:
    cfg = load(tmp_path, {"CALLFS_AUTH__API_KEY_USERS__ALICE": "a" * 16}).config
    spec = pickle.load(io.BytesIO(_pickle(WorkerSpec(cfg, 1, "/tmp/d", 8443))))
    assert spec == WorkerSpec(cfg, 1, "/tmp/d", 8443)
    assert spec.cfg.auth.api_key_users == {"alice": "a" * 16}
    with pytest.raises(TypeError):
        spec.cfg.auth.api_key_users["bob"] = "b" * 16  # still read-only
    assert spec.primary_socket == "/tmp/d/primary.sock"
    assert spec.metrics_socket == "/tmp/d/worker-1.sock"


def test_a_worker_process_names_itself_on_every_log_line() -> None:
    from callfs.log import ConsoleFormatter, JsonFormatter, set_worker

    record = logging.LogRecord("callfs.x", logging.INFO, __file__, 1, "hello", None, None)
    try:
        set_worker(2)
        assert json.loads(JsonFormatter().format(record))["worker"] == 2
        assert ConsoleFormatter().format(record).endswith(" worker=2")
        set_worker(None)  # the primary, or a node of one process: no field
        assert "worker" not in json.loads(JsonFormatter().format(record))
        assert "worker=" not in ConsoleFormatter().format(record)
    finally:
        set_worker(None)


def test_socket_directories_of_dead_primaries_are_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A primary killed with SIGKILL leaves its socket directory; the next primary on the
    machine removes it, but never one of a primary still running, nor anything else."""
    import subprocess
    import sys
    import tempfile

    from callfs.workers import private_directory

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    dead = tmp_path / f"callfs-workers-{gone.stdout.strip()}-abc"
    alive = tmp_path / f"callfs-workers-{os.getpid()}-def"
    other = tmp_path / "callfs-workers-notapid"
    for d in (dead, alive, other):
        d.mkdir()
        (d / "primary.sock").write_text("")
    made = private_directory()
    assert not dead.exists()
    assert alive.exists() and other.exists()
    assert os.path.basename(made).startswith(f"callfs-workers-{os.getpid()}-")
    assert os.stat(made).st_mode & 0o777 == 0o700


async def test_a_workers_own_503_carries_retry_after_and_a_request_id(tmp_path: Path) -> None:
    """A worker that cannot reach its primary answers 503 itself, before the pipeline: it had
    no ``Retry-After`` (§8) and no ``X-Request-ID`` (§3) (found by review)."""
    from callfs.api.relay import PrimaryRelay

    relay = PrimaryRelay(str(tmp_path / "no-such.sock"), 8)
    resp = await relay.forward(make_mocked_request("GET", "/v1/files/x"))  # shutting down
    assert resp.status == 503
    assert resp.headers["Retry-After"] == "1"
    assert re.fullmatch(r"[0-9a-f]{16}", resp.headers["X-Request-ID"])
