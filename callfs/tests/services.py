"""Private PostgreSQL and Redis servers for tests that stop, restart or kill their store.

The machine's shared servers (127.0.0.1:5432 and :6379) are never touched: each helper starts a
new server on a free port with its own data directory, and only ever signals the process it
started itself.

    pg = start_private_postgres(tmp_path)   # pg.dsn; pg.stop(); pg.start(); pg.close()
    rd = start_private_redis(tmp_path, appendonly=True)   # rd.addr; rd.stop(); rd.start(); ...

``stop()`` is a clean shutdown that keeps the data, ``start()`` brings the same server back on the
same port and data directory, ``close()`` stops it if needed and removes what the helper created.
Prefer the context managers ``private_postgres`` / ``private_redis``: they always ``close()``.
A missing binary is an error, never a skip (a missing service fails CI).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
START_TIMEOUT = 30.0


def free_port() -> int:
    """A TCP port nothing listens on right now (the server binds it a moment later)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _wait(check: Callable[[], bool], what: str, timeout: float, logs: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} not ready within {timeout}s:\n{logs()}")


def _tail(path: Path, limit: int = 5000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return f"(no log at {path})"


# ---- PostgreSQL --------------------------------------------------------------------------------


def postgres_bin_dir() -> Path:
    """The newest ``/usr/lib/postgresql/*/bin`` with initdb, else the directory of ``initdb``."""

    def version(initdb: str) -> int:
        name = Path(initdb).parent.parent.name
        return int(name) if name.isdigit() else 0

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version)
    if found:
        return Path(found[-1]).parent
    which = shutil.which("initdb")
    if which is None:
        raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) not found")
    return Path(which).resolve().parent


@dataclass
class PrivatePostgres:
    """One PostgreSQL cluster of our own, trust auth, superuser ``postgres``, TCP on ``port``.

    As root the server runs as the ``postgres`` OS user (PostgreSQL refuses root). That user
    cannot enter pytest's 0700 temp directories, so then the data directory is a private
    ``mkdtemp`` directory owned by ``postgres`` (removed by ``close``); otherwise it lives in
    ``tmp``. The server log is copied next to ``tmp`` on ``close``.
    """

    tmp: Path
    port: int
    data_dir: Path
    bin_dir: Path
    run_as: str | None
    _own_root: Path | None = None
    _running: bool = field(default=False, init=False)

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@{HOST}:{self.port}/postgres"

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / "postgres.log"

    def _cmd(self, *args: str) -> list[str]:
        prefix = ["runuser", "-u", self.run_as, "--"] if self.run_as else []
        return [*prefix, *args]

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self._cmd(*args), cwd="/", capture_output=True, text=True, check=check, timeout=60
        )

    def init(self) -> None:
        self._run(
            str(self.bin_dir / "initdb"),
            "-D",
            str(self.data_dir),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-sync",
        )

    def start(self) -> None:
        """Start (or restart after ``stop``) on the same port and data directory; wait for it."""
        # TCP only (-k ''): no socket in the shared /var/run/postgresql, no socket path limit
        options = f"-p {self.port} -h {HOST} -k '' -c fsync=off"
        result = self._run(
            str(self.bin_dir / "pg_ctl"),
            "-D",
            str(self.data_dir),
            "-l",
            str(self.log_path),
            "-o",
            options,
            "-w",
            "-t",
            str(int(START_TIMEOUT)),
            "start",
            check=False,
        )
        if result.returncode != 0:
            raise AssertionError(
                f"private PostgreSQL did not start: {result.stdout}{result.stderr}\n{self.logs()}"
            )
        self._running = True
        _wait(self.ready, "private PostgreSQL", START_TIMEOUT, self.logs)

    def ready(self) -> bool:
        return (
            subprocess.run(
                [str(self.bin_dir / "pg_isready"), "-h", HOST, "-p", str(self.port), "-q"],
                check=False,
            ).returncode
            == 0
        )

    def stop(self, mode: str = "fast") -> None:
        """Shut this server down (``fast``: clean, data kept; ``immediate``: like a crash)."""
        if not self._running:
            return
        self._run(
            str(self.bin_dir / "pg_ctl"),
            "-D",
            str(self.data_dir),
            "-m",
            mode,
            "-w",
            "stop",
            check=False,
        )
        self._running = False

    def close(self) -> None:
        try:
            self._running = self._running or (self.data_dir / "postmaster.pid").exists()
            self.stop("immediate")
        finally:
            if self._own_root is not None:
                with contextlib.suppress(OSError):
                    shutil.copyfile(self.log_path, self.tmp / "postgres.log")
                shutil.rmtree(self._own_root, ignore_errors=True)

    def logs(self) -> str:
        return _tail(self.log_path)


def start_private_postgres(tmp: Path) -> PrivatePostgres:
    """initdb + start a private PostgreSQL on a free port; the caller must ``close()`` it."""
    bin_dir = postgres_bin_dir()
    tmp.mkdir(parents=True, exist_ok=True)
    own_root: Path | None = None
    run_as: str | None = None
    if os.geteuid() == 0:
        run_as = "postgres"
        user = pwd.getpwnam(run_as)
        own_root = Path(tempfile.mkdtemp(prefix="callfs-test-pg-"))
        os.chown(own_root, user.pw_uid, user.pw_gid)
        root = own_root
    else:
        root = tmp / "postgres"
        root.mkdir()
    server = PrivatePostgres(
        tmp=tmp,
        port=free_port(),
        data_dir=root / "data",
        bin_dir=bin_dir,
        run_as=run_as,
        _own_root=own_root,
    )
    try:
        server.init()
        server.start()
    except BaseException:
        server.close()
        raise
    return server


@contextlib.contextmanager
def private_postgres(tmp: Path) -> Iterator[PrivatePostgres]:
    server = start_private_postgres(tmp)
    try:
        yield server
    finally:
        server.close()


# ---- Redis -------------------------------------------------------------------------------------


@dataclass
class PrivateRedis:
    """One ``redis-server`` child process of our own on ``port`` with ``data_dir`` as its dir.

    With ``appendonly`` every write is in the AOF (``appendfsync always``) before it is
    acknowledged, so the data survives ``stop`` / ``kill`` and ``start``. Without it nothing is
    persisted (``save ""``), like the machine's CI Redis.
    """

    port: int
    data_dir: Path
    appendonly: bool = False
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def addr(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "redis.log"

    def args(self) -> list[str]:
        redis_server = shutil.which("redis-server")
        if redis_server is None:
            raise RuntimeError("redis-server not found")
        return [
            redis_server,
            "--port",
            str(self.port),
            "--bind",
            HOST,
            "--dir",
            str(self.data_dir),
            "--daemonize",
            "no",
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "always",
            "--logfile",
            str(self.log_path),
        ]

    def start(self) -> None:
        """Start (or restart after ``stop``) on the same port and dir; wait until it serves."""
        if self.proc is not None and self.proc.poll() is None:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            self.args(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        _wait(self.ready, "private Redis", START_TIMEOUT, self.logs)

    def ready(self) -> bool:
        """True once the server answers PING with PONG (not -LOADING while reading its AOF)."""
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"private Redis exited:\n{self.logs()}")
        try:
            with socket.create_connection((HOST, self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Signal our own server and wait for it to exit. SIGTERM is Redis's clean shutdown
        (the AOF is flushed and fsynced); SIGKILL is a crash."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.proc = None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def close(self) -> None:
        self.stop()

    def logs(self) -> str:
        return _tail(self.log_path)


def start_private_redis(tmp: Path, appendonly: bool = False) -> PrivateRedis:
    """Start a private redis-server on a free port with its dir under ``tmp``; ``close()`` it."""
    server = PrivateRedis(port=free_port(), data_dir=tmp / "redis", appendonly=appendonly)
    try:
        server.start()
    except BaseException:
        server.close()
        raise
    return server


@contextlib.contextmanager
def private_redis(tmp: Path, appendonly: bool = False) -> Iterator[PrivateRedis]:
    server = start_private_redis(tmp, appendonly)
    try:
        yield server
    finally:
        server.close()
