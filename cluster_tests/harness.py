"""Real ``callfs server`` processes on 127.0.0.1 with generated configs. Poll with deadlines."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

API_KEY = "cluster-test-key-0123456789"
OTHER_KEY = "cluster-test-key-other-0123"
INTERNAL = "cluster-internal-secret-0123456789"
LINK_SECRET = "cluster-link-secret-0123456789"


def until(check: Callable[[], Any], timeout: float, what: str, every: float = 0.2) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming the last value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def free_ports(n: int) -> list[int]:
    """Bind n sockets at once so the ports differ, then release them for the children."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class ClusterNode:
    name: str
    port: int
    workdir: Path
    config: dict[str, Any]
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)
    #: What runs the server: ``python <launcher...> server -c <config>``.
    launcher: tuple[str, ...] = ("-m", "callfs")
    #: Extra environment of the server process.
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.log_path = self.workdir / f"{self.name}.log"
        self._health: Any = lambda: urllib.request.urlopen(self.base + "/health", timeout=1)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg_path = self.workdir / f"{self.name}.yaml"
        cfg_path.write_text(yaml.safe_dump(self.config))
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        env = {k: v for k, v in os.environ.items() if not k.startswith("CALLFS_")}
        env.update(self.env)
        self.proc = subprocess.Popen(
            [sys.executable, *self.launcher, "server", "-c", str(cfg_path)],
            cwd=self.workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited {self.proc.returncode}:\n{self.logs()}")
            try:
                with self._health() as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError) as exc:
                last = repr(exc)
            time.sleep(0.1)
        raise AssertionError(f"{self.name} not healthy in {timeout}s ({last}):\n{self.logs()}")

    def start_tls(self, ca_file: Path, timeout: float = 30.0) -> None:
        """Like ``start`` for a node serving HTTPS with a certificate signed by ``ca_file``."""
        if self.config["server"].get("protocol") != "https":
            self.start(timeout)
            return
        import ssl

        ctx = ssl.create_default_context(cafile=str(ca_file))
        self._health = lambda: urllib.request.urlopen(
            f"https://127.0.0.1:{self.port}/health", timeout=1, context=ctx
        )
        self.start(timeout)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-5000:]
        except OSError:
            return "(no log)"


def node_config(
    name: str,
    port: int,
    workdir: Path,
    peers: dict[str, str],
    metadata: dict[str, Any],
    dlm: dict[str, Any],
) -> dict[str, Any]:
    return {
        "server": {
            "protocol": "http",
            "cert_file": "",
            "key_file": "",
            "listen_addr": f"127.0.0.1:{port}",
            "external_url": f"http://127.0.0.1:{port}",
        },
        "metrics": {"listen_addr": ""},
        "log": {"level": "info", "format": "console"},
        "auth": {
            "api_key_users": {"alice": API_KEY, "bob": OTHER_KEY},
            "internal_proxy_secret": INTERNAL,
            "single_use_link_secret": LINK_SECRET,
        },
        "backend": {"localfs_root_path": str(workdir / name / "files")},
        "metadata_store": metadata,
        "dlm": dlm,
        "instance_discovery": {
            "instance_id": name,
            "peer_endpoints": {k: v for k, v in peers.items() if k != name},
        },
    }


PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
#: moto's S3 accepts any credentials; these are the tests'.
CREDS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


@contextmanager
def moto_server(tmp_path: Path, tag: str) -> Iterator[tuple[subprocess.Popen[bytes], str, str]]:
    """moto's S3 server in its own process (so a test can freeze it), with a fresh bucket:
    (process, endpoint, bucket)."""
    import boto3

    (port,) = free_ports(1)
    endpoint = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "moto.log", "wb")  # noqa: SIM115 - the child's for its lifetime
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    try:
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **CREDS)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.list_buckets()
                break
            except Exception:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.2)
        bucket = f"callfs-{tag}-{uuid.uuid4().hex[:8]}"
        client.create_bucket(Bucket=bucket)
        yield proc, endpoint, bucket
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
            proc.wait(30)


@asynccontextmanager
async def private_pg_database(tag: str) -> AsyncIterator[dict[str, Any]]:
    """A fresh database on the machine's shared PostgreSQL (dropped afterwards; the server
    itself is never touched): the ``metadata_store`` section of a config using it."""
    import asyncpg

    db = f"callfs_{tag}_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    await conn.execute(f'CREATE DATABASE "{db}"')
    await conn.close()
    try:
        yield {"type": "postgres", "dsn": f"postgresql://postgres@127.0.0.1:5432/{db}"}
    finally:
        conn = await asyncpg.connect(PG_ADMIN_DSN)
        await conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        await conn.close()


def redis_locks(tag: str) -> dict[str, Any]:
    """A ``dlm`` section: the shared Redis under a prefix of this test's own."""
    return {
        "type": "redis",
        "redis_addr": "127.0.0.1:6379",
        "redis_key_prefix": f"callfs-{tag}-{uuid.uuid4().hex[:8]}:",
    }


def shared_store_nodes(
    names: list[str], workdir: Path, store: dict[str, Any], dlm: dict[str, Any]
) -> dict[str, ClusterNode]:
    """Nodes (not started) over one metadata store, each listing every node as a peer."""
    ports = free_ports(len(names))
    peers = {n: f"http://127.0.0.1:{p}" for n, p in zip(names, ports, strict=True)}
    return {
        name: ClusterNode(name, port, workdir, node_config(name, port, workdir, peers, store, dlm))
        for name, port in zip(names, ports, strict=True)
    }
