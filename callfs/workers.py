"""``server.workers``: one node served by several processes (docs/workers.md).

The process ``callfs server`` starts is the node's *primary*: it runs everything a node runs
(background jobs, the metrics listener, HTTP/3, rate-limit buckets, resumable uploads). With
``server.workers: N`` it also starts N-1 *worker* processes (``python -m callfs.worker``). Each is
a full request server over the same metadata store and disks, listening on the same port
(``SO_REUSEPORT``: the kernel spreads connections over the processes), so requests use every
core. Workers relay the few routes whose state is per process to the primary
(``callfs.api.relay``) and run no background work.

The primary hands each worker its resolved configuration on stdin, then keeps that pipe open:
a worker whose stdin reaches end of file has lost its primary (even to kill -9) and stops. A
worker that dies is started again; the primary stops its workers before it stops itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import copyreg
import errno
import io
import logging
import os
import pickle
import shutil
import signal
import socket
import stat
import sys
import tempfile
import threading
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import aiohttp

from callfs.config import Config
from callfs.errors import ConfigError
from callfs.metrics import Metrics, merge_expositions, monotonic_only

log = logging.getLogger(__name__)

#: A worker not serving this long after it was started counts as failed.
READY_TIMEOUT = 60.0
#: Waits before a dead worker is started again: doubled per failure in a row, up to the last.
_RESTART_DELAYS = (1.0, 2.0, 5.0, 15.0, 30.0)
#: A worker that served this long before it died starts again after the shortest wait.
_HEALTHY_RUN = 60.0
#: A worker's metrics must arrive within this; a slow or dead one is left out of the sum.
_SCRAPE_TIMEOUT = 2.0
#: Every this many seconds the primary asks each worker that signalled ready whether its event
#: loop still answers (within ``PROBE_WAIT``)...
PROBE_EVERY = 3.0
PROBE_WAIT = 5.0
#: ...and kills one that missed this many answers in a row (it is started again): a hung worker
#: keeps its share of the port, and every connection the kernel gives it would hang too.
PROBE_MISSES = 3
_READY = b"ready\n"
#: The worker's answer to "is your event loop alive" (its private socket; ``_probe``).
ALIVE_PATH = "/alive"
#: Listen backlog of the shared port's sockets (aiohttp's default).
_BACKLOG = 128


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process needs from its primary (pickled onto the worker's stdin)."""

    cfg: Config
    index: int
    #: The primary's private directory (mode 0700) of unix sockets.
    directory: str
    #: The main listener's port, as bound by the primary (the config may say 0).
    port: int

    @property
    def primary_socket(self) -> str:
        return primary_socket(self.directory)

    @property
    def metrics_socket(self) -> str:
        return metrics_socket(self.directory, self.index)


def primary_socket(directory: str) -> str:
    return os.path.join(directory, "primary.sock")


def metrics_socket(directory: str, index: int) -> str:
    return os.path.join(directory, f"worker-{index}.sock")


_DIR_PREFIX = "callfs-workers-"


def private_directory() -> str:
    """A new directory (mode 0700) for the primary's sockets, named after its pid. Those of
    primaries that died without removing theirs (kill -9) go first: a directory of this user,
    named for a pid that no longer runs."""
    base = tempfile.gettempdir()
    with contextlib.suppress(OSError):
        for name in os.listdir(base):
            pid = name[len(_DIR_PREFIX) :].split("-", 1)[0]
            if not name.startswith(_DIR_PREFIX) or not pid.isdigit() or _running(int(pid)):
                continue
            path = os.path.join(base, name)
            with contextlib.suppress(OSError):
                st = os.lstat(path)
                if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid():
                    shutil.rmtree(path, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{os.getpid()}-", dir=base)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def listen_sockets(host: str | None, port: int, *, check_free: bool) -> list[socket.socket]:
    """Listening sockets with ``SO_REUSEPORT`` on every address of ``host`` (all interfaces when
    None, as aiohttp binds them), all on one port (the system's pick when ``port`` is 0).

    ``check_free`` (the primary): first bind each address without ``SO_REUSEPORT`` and release
    it. The sockets that follow share the port with any other socket that set the option, so a
    second server of the same user would otherwise join the port silently (two nodes on one
    port); this way start-up fails with "address already in use", as with one process (§2).
    Nothing runs between the check and the real binds (no await): a server that checks after
    them finds the port taken."""
    infos = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE if host is None else 0
    )
    addresses = list(dict.fromkeys((family, addr) for family, _, _, _, addr in infos))
    if check_free:
        for family, addr in list(addresses):
            probe = _open_for(family, addr, host, port)
            if probe is None:
                addresses.remove((family, addr))
                continue
            port = port or int(probe.getsockname()[1])
            probe.close()
    made: list[socket.socket] = []
    try:
        for family, addr in addresses:
            sock = _open_for(family, addr, host, port, reuse_port=True)
            if sock is None:
                continue
            made.append(sock)
            port = port or int(sock.getsockname()[1])
            sock.listen(_BACKLOG)
            sock.setblocking(False)
        if not made:
            raise OSError(errno.EADDRNOTAVAIL, f"no address to listen on for {host!r}")
    except BaseException:
        for sock in made:
            sock.close()
        raise
    return made


def _open_for(
    family: int, addr: tuple[Any, ...], host: str | None, port: int, reuse_port: bool = False
) -> socket.socket | None:
    """A TCP socket bound to ``addr`` at ``port``; None for an address this host cannot use
    while listening on all interfaces (IPv6 disabled or not configured), skipped as asyncio
    skips it. Any other failure (the port taken, above all) is raised."""
    try:
        sock = _tcp_socket(family)
    except OSError:
        return None  # a family the kernel lacks
    try:
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        _bind(sock, _with_port(addr, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRNOTAVAIL and host is None:
            return None
        raise
    return sock


def _tcp_socket(family: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's servers do
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    return sock


def _bind(sock: socket.socket, addr: tuple[Any, ...]) -> None:
    """Bind, failing with the address in the message (as asyncio's own servers do)."""
    try:
        sock.bind(addr)
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        raise OSError(
            exc.errno, f"error while attempting to bind on address {addr[:2]!r}: {reason}"
        ) from exc


def _with_port(addr: tuple[Any, ...], port: int) -> tuple[Any, ...]:
    return (addr[0], port, *addr[2:])


class WorkerPool:
    """The primary's worker processes: started before it accepts on the main port (so a node that
    answers serves with every process), restarted when they die, and stopped (SIGTERM, then
    SIGKILL after ``stop_timeout``) before the primary stops."""

    def __init__(
        self, cfg: Config, directory: str, port: int, stop_timeout: float, metrics: Metrics
    ) -> None:
        self._cfg = cfg
        self._metrics = metrics
        self._directory = directory
        self._port = port
        self._stop_timeout = stop_timeout
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self._watchers: list[asyncio.Task[None]] = []
        self._closing = False
        #: index -> (pid, its last exposition): stands in for a worker slow to answer a scrape
        self._last: dict[int, tuple[int, bytes]] = {}
        #: the counters of worker processes gone (died, restarted), summed
        self._retired = b""
        #: one scrape at a time: two scrapers at once (an HA Prometheus pair) could otherwise
        #: retire a dead worker's counters twice
        self._scraping = asyncio.Lock()
        #: index -> pid of the worker that signalled ready (the probe leaves starting ones alone:
        #: ``READY_TIMEOUT`` covers those)
        self._ready: dict[int, int] = {}

    @property
    def count(self) -> int:
        return self._cfg.server.workers

    def pids(self) -> dict[int, int]:
        """Worker index -> process id of the workers running now."""
        return {i: p.pid for i, p in self._procs.items() if p.returncode is None}

    async def start(self) -> None:
        indexes = range(1, self.count)
        results = await asyncio.gather(*(self._spawn(i) for i in indexes), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            await self.close()
            raise failed[0]
        self._watchers = [
            asyncio.create_task(self._watch(i), name=f"callfs-worker-{i}") for i in indexes
        ] + [asyncio.create_task(self._probe(i), name=f"callfs-probe-{i}") for i in indexes]
        log.info("serving with %d processes (pids %s)", self.count, self._all_pids())

    def _all_pids(self) -> str:
        return ", ".join(str(p) for p in [os.getpid(), *self.pids().values()])

    async def _spawn(self, index: int) -> None:
        data = _pickle(WorkerSpec(self._cfg, index, self._directory, self._port))
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "callfs.worker",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        self._procs[index] = proc
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(len(data).to_bytes(8, "big") + data)
            await proc.stdin.drain()
            line = await asyncio.wait_for(proc.stdout.readline(), READY_TIMEOUT)
        except Exception:  # a broken pipe, the timeout, or garbage instead of the ready line
            line = b""
        if line == _READY:
            self._ready[index] = proc.pid
        else:
            await _terminate(proc, 5.0)
            raise ConfigError(
                f"worker process {index} did not start (exit code {proc.returncode}); "
                "its log lines above say why"
            )

    async def _watch(self, index: int) -> None:
        failures = 0
        loop = asyncio.get_running_loop()
        while True:
            proc = self._procs[index]
            started = loop.time()
            code = await proc.wait()
            if code == 0 and not self._closing:
                # A clean exit: most likely a stop signal sent to every process at once
                # (systemd's default), which this process is acting on too.
                await asyncio.sleep(1.0)
            if self._closing:
                return
            if loop.time() - started >= _HEALTHY_RUN:
                failures = 0
            delay = _RESTART_DELAYS[min(failures, len(_RESTART_DELAYS) - 1)]
            log.error(
                "worker process %d (pid %d) exited with code %s; starting it again in %.0f s",
                index, proc.pid, code, delay,
            )  # fmt: skip
            await asyncio.sleep(delay)
            if self._closing:
                return
            failures += 1
            try:
                await self._spawn(index)
            except ConfigError as exc:  # its dead process is waited for at the top
                log.error("%s", exc.message)
                continue
            except Exception:  # no process at all (out of file descriptors, memory...)
                log.exception("could not start worker process %d; trying again", index)
                await asyncio.sleep(_RESTART_DELAYS[-1])
                continue
            self._metrics.worker_restarts.inc()

    async def _probe(self, index: int) -> None:
        """Kill the worker ``index`` if its event loop stops answering (stuck in a call that
        never returns, stopped by SIGSTOP): ``_watch`` starts it again."""
        loop = asyncio.get_running_loop()
        misses = 0
        watched: int | None = None
        answered = loop.time()
        while True:
            await asyncio.sleep(PROBE_EVERY)
            proc = self._procs.get(index)
            if proc is None or proc.returncode is not None or self._ready.get(index) != proc.pid:
                continue  # being started (again)
            if proc.pid != watched:
                watched, misses, answered = proc.pid, 0, loop.time()
            if await self._ask(index, ALIVE_PATH, PROBE_WAIT) is not None:
                misses, answered = 0, loop.time()
                continue
            misses += 1
            if misses < PROBE_MISSES:
                continue
            log.error(
                "worker process %d (pid %d) has not answered for %.0f s; killing it",
                index, proc.pid, loop.time() - answered,
            )  # fmt: skip
            self._metrics.errors.labels("workers", "hung").inc()
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            misses = 0

    async def close(self) -> None:
        self._closing = True
        for task in self._watchers:
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        self._watchers.clear()
        await asyncio.gather(*(_terminate(p, self._stop_timeout) for p in self._procs.values()))
        self._procs.clear()

    async def exposition(self, own: bytes) -> bytes:
        """The node's metrics: the primary's ``own`` plus every running worker's, plus what the
        workers gone had counted. Counters never go backwards (a scraper takes a drop for a
        reset, and ``rate()`` jumps): a process that died or was restarted leaves its last
        scraped counters in the sums, and one that misses a scrape is counted as last seen."""
        async with self._scraping:
            return await self._exposition(own)

    async def _exposition(self, own: bytes) -> bytes:
        pids = self.pids()
        for index, (pid, last) in list(self._last.items()):
            if pids.get(index) != pid:
                del self._last[index]
                self._retired = monotonic_only(merge_expositions(b"", [self._retired, last]))
        indexes = list(pids)
        texts = await asyncio.gather(*(self._scrape(i) for i in indexes))
        parts = [self._retired]
        for index, scraped in zip(indexes, texts, strict=True):
            if scraped is not None:
                self._last[index] = (pids[index], scraped)
                parts.append(scraped)
            elif index in self._last:
                parts.append(monotonic_only(self._last[index][1]))
        return merge_expositions(own, parts)

    async def _scrape(self, index: int) -> bytes | None:
        text = await self._ask(index, "/metrics", _SCRAPE_TIMEOUT)
        if text is None:
            log.warning("metrics of worker process %d left out: no answer", index)
        return text

    async def _ask(self, index: int, path: str, within: float) -> bytes | None:
        """GET ``path`` on the worker's private socket: the body, None if no good answer came
        within ``within`` seconds."""
        connector = aiohttp.UnixConnector(path=metrics_socket(self._directory, index))
        timeout = aiohttp.ClientTimeout(total=within)
        try:
            async with (
                aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
                session.get(f"http://callfs-worker{path}") as resp,
            ):
                resp.raise_for_status()
                return await resp.read()
        except (aiohttp.ClientError, TimeoutError, OSError):
            return None


def _pickle(spec: WorkerSpec) -> bytes:
    """``spec`` pickled; the config's read-only maps go as plain dicts and come back read-only."""
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer)
    table = copyreg.dispatch_table.copy()
    table[MappingProxyType] = lambda m: (_read_only, (dict(m),))
    pickler.dispatch_table = table
    pickler.dump(spec)
    return buffer.getvalue()


def _read_only(items: dict[str, Any]) -> MappingProxyType[str, Any]:
    return MappingProxyType(items)


async def _terminate(proc: asyncio.subprocess.Process, grace: float) -> None:
    if proc.stdin is not None:
        proc.stdin.close()  # end of file: the worker stops even if the signal is lost
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), grace)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


# ---- the worker's side ---------------------------------------------------------------------


def read_spec() -> WorkerSpec:
    """The spec the primary wrote on stdin (length, then pickle); the pipe stays open after.
    Only the primary writes there: the pipe is the trust boundary (a worker is its child)."""
    size = int.from_bytes(_read_exactly(8), "big")
    spec = pickle.loads(_read_exactly(size))  # noqa: S301
    if not isinstance(spec, WorkerSpec):
        raise SystemExit("callfs.worker: no worker spec on stdin")
    return spec


def _read_exactly(size: int) -> bytes:
    chunks: list[bytes] = []
    while size:
        chunk = os.read(0, size)
        if not chunk:
            raise SystemExit("callfs.worker: stdin closed before the worker spec was read")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def signal_ready() -> None:
    """Tell the primary this worker serves; then stdout goes where stderr goes, so nothing can
    block on a pipe nobody reads any more."""
    os.write(1, _READY)
    os.dup2(2, 1)


def watch_primary(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """Set ``stop`` when the primary's end of stdin closes (it stopped, or died)."""

    def wait() -> None:
        with contextlib.suppress(OSError):
            while os.read(0, 4096):
                pass
        with contextlib.suppress(RuntimeError):  # the loop already closed: nothing to stop
            loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=wait, name="callfs-primary-watch", daemon=True).start()
