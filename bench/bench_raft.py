"""Raft metadata store through the HTTP API, next to a one-node SQLite server in the same run
(issue 11). Prints figures; not a test.

    python bench/bench_raft.py [--seconds 10] [--clients 16] [--keep]

Both setups are real ``callfs server`` subprocesses (http, ``log.level: warn``, localfs backend):
(a) one node, ``metadata_store.type: sqlite``, local locks; (b) three nodes,
``metadata_store.type: raft`` (``cluster_tests/raftlib.raft_cluster``). The load generator is an
aiohttp client in this process (it shares the machine's cores with the servers). Per setup:

- **create**: ``--clients`` clients POST new 4 KiB files for ``--seconds`` (Raft: client k talks
  to node k mod 3, so two thirds of the commits are forwarded by a follower to the leader);
  creates/s over the phase, p50/p99 of the successful requests.
- **stat**: HEAD /v1/files/<created path> for ``--seconds`` on a follower (and on the leader, for
  reference) / on the single node. A follower's HEAD takes the read barrier (it asks the leader
  for its commit index over HTTP). Run twice: with the aiohttp client, and with a lean
  raw-socket client (``lean_stats``) whose own CPU per request is about a third of aiohttp's, so
  that the figure is less the load generator's queueing on the shared two cores.
- **failover** (Raft only): 4 writers POST through the two followers; the leader is killed with
  SIGKILL; time from the kill to the first successful write issued after it, the longest gap
  between two successful writes, and when the survivors agree on a new leader.

CPU seconds of every server process over the create phase are read from /proc (user+system).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import shutil
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cluster_tests.harness import (
    API_KEY,
    INTERNAL,
    ClusterNode,
    free_ports,
    node_config,
)
from cluster_tests.raftlib import raft_cluster, wait_leader

H = {"Authorization": f"Bearer {API_KEY}"}
BODY = os.urandom(4096)
CLK_TCK = os.sysconf("SC_CLK_TCK")


def load() -> str:
    with open("/proc/loadavg") as f:
        return "load " + " ".join(f.read().split()[:3])


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def pct(lat: list[float], q: float) -> float:
    if not lat:
        return float("nan")
    s = sorted(lat)
    return s[min(len(s) - 1, max(0, round(q * len(s)) - 1))] * 1e3


@dataclass
class Phase:
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    lat: list[float] = field(default_factory=list)
    wall: float = 0.0
    load: str = ""
    cpu: dict[str, float] = field(default_factory=dict)
    #: Latencies of the successful requests by the node they went to (when more than one).
    by_node: dict[str, list[float]] = field(default_factory=dict)
    #: CPU seconds this (load generator) process spent over the phase.
    client_cpu: float = 0.0

    @property
    def rate(self) -> float:
        return self.ok / self.wall if self.wall else 0.0

    def line(self) -> str:
        err = f", errors {self.errors}" if self.errors else ""
        client = self.client_cpu / max(self.ok, 1) * 1e3
        return (
            f"{self.rate:,.0f}/s  p50 {pct(self.lat, 0.5):.2f}  p99 {pct(self.lat, 0.99):.2f} ms"
            f"  ({self.ok} ok{err}; client CPU {client:.2f} ms/req; {self.load})"
        )


async def clocked(out: Phase, clients: int, client: Callable[[int], Awaitable[None]]) -> Phase:
    """Run ``client(k)`` for k < ``clients`` at once; the wall time, this process's CPU and the
    load go into ``out``."""
    start, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(client(k) for k in range(clients)))
    out.wall = time.perf_counter() - start
    out.client_cpu = time.process_time() - cpu
    out.load = load()
    return out


async def run_phase(
    seconds: float,
    clients: int,
    op: Callable[[aiohttp.ClientSession, int, int], Any],
    session: aiohttp.ClientSession,
    node_of: Callable[[int], str] | None = None,
) -> Phase:
    """``clients`` loops calling ``op(session, client, i)`` -> HTTP status for ``seconds``;
    ``node_of(client)`` names the node a client talks to, for latencies per node."""
    out = Phase()
    stop = time.perf_counter() + seconds

    async def client(k: int) -> None:
        i = 0
        while time.perf_counter() < stop:
            t = time.perf_counter()
            try:
                status = await op(session, k, i)
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                status = type(exc).__name__
            if status in (200, 201):
                out.ok += 1
                took = time.perf_counter() - t
                out.lat.append(took)
                if node_of is not None:
                    out.by_node.setdefault(node_of(k), []).append(took)
            else:
                out.errors[str(status)] = out.errors.get(str(status), 0) + 1
            i += 1

    return await clocked(out, clients, client)


async def post(session: aiohttp.ClientSession, base: str, path: str, timeout: float = 30) -> int:
    async with session.post(
        base + "/v1/files" + path,
        data=BODY,
        headers=H,
        timeout=aiohttp.ClientTimeout(total=timeout),
    ) as r:
        await r.read()
        return r.status


async def head(session: aiohttp.ClientSession, base: str, path: str) -> int:
    async with session.head(
        base + "/v1/files" + path, headers=H, timeout=aiohttp.ClientTimeout(total=30)
    ) as r:
        return r.status


async def mkdirs(session: aiohttp.ClientSession, base: str, clients: int, tag: str) -> None:
    for k in range(clients):
        status = await post(session, base, f"/{tag}/c{k:02d}/")
        if status not in (200, 201):
            raise SystemExit(f"mkdir /{tag}/c{k:02d}/ answered {status}")


async def creates(
    session: aiohttp.ClientSession, bases: list[str], seconds: float, clients: int, tag: str
) -> tuple[Phase, list[str]]:
    created: list[str] = []

    async def op(s: aiohttp.ClientSession, k: int, i: int) -> int:
        path = f"/{tag}/c{k:02d}/f{i:07d}"
        status = await post(s, bases[k % len(bases)], path)
        if status == 201:
            created.append(path)
        return status

    phase = await run_phase(
        seconds, clients, op, session, node_of=lambda k: f"node-{k % len(bases) + 1}"
    )
    return phase, created


async def stats(
    session: aiohttp.ClientSession, base: str, paths: list[str], seconds: float, clients: int
) -> Phase:
    rnd = random.Random(1)

    async def op(s: aiohttp.ClientSession, _k: int, _i: int) -> int:
        return await head(s, base, rnd.choice(paths))

    return await run_phase(seconds, clients, op, session)


async def lean_stats(base: str, paths: list[str], seconds: float, clients: int) -> Phase:
    """The stat phase with a lean load generator: ``clients`` keep-alive connections, each
    writing a HEAD request and reading the response head off a raw socket. aiohttp's client
    spends about as much CPU per request as the server does (the ``client CPU`` of the
    ``stats`` line), on the same two cores, so its latencies include the client's own queueing;
    this one costs about a third of that (wrk cannot be used: it waits for a HEAD's body)."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    out = Phase()
    stop = time.perf_counter() + seconds

    async def client(k: int) -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        rnd = random.Random(k)
        try:
            while time.perf_counter() < stop:
                path = rnd.choice(paths)
                request = (
                    f"HEAD /v1/files{path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                    f"Authorization: {H['Authorization']}\r\n\r\n"
                ).encode()
                t = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")  # a HEAD answer has no body
                took = time.perf_counter() - t
                status = int(head[9:12])
                if status == 200:
                    out.ok += 1
                    out.lat.append(took)
                else:
                    out.errors[str(status)] = out.errors.get(str(status), 0) + 1
        finally:
            writer.close()

    return await clocked(out, clients, client)


async def raft_status(session: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    async with session.get(
        base + "/v1/internal/raft/status",
        headers={"Authorization": f"Bearer {INTERNAL}"},
        timeout=aiohttp.ClientTimeout(total=1),
    ) as r:
        out: dict[str, Any] = await r.json()
        return out


async def commit_totals(session: aiohttp.ClientSession, base: str) -> tuple[float, float]:
    """(sum seconds, count) of callfs_raft_commit_duration_seconds on one node."""
    async with session.get(
        base + "/metrics", headers=H, timeout=aiohttp.ClientTimeout(total=5)
    ) as r:
        text = await r.text()
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith("callfs_raft_commit_duration_seconds_sum"):
            total = float(line.split()[-1])
        elif line.startswith("callfs_raft_commit_duration_seconds_count"):
            count = float(line.split()[-1])
    return total, count


async def failover(
    session: aiohttp.ClientSession, leader: ClusterNode, survivors: list[ClusterNode]
) -> dict[str, Any]:
    """4 writers through ``survivors``; SIGKILL ``leader`` after 2 s of writes."""
    ok: list[tuple[float, float]] = []  # (started, finished) of successful writes
    failures: dict[str, int] = {}
    done = asyncio.Event()
    kill_at: list[float] = []
    leader_seen: list[float] = []

    async def writer(k: int) -> None:
        i = 0
        base = survivors[k % len(survivors)].base
        while not done.is_set():
            t = time.perf_counter()
            try:
                status = await post(session, base, f"/fo/w{k}/f{i:07d}", timeout=15)
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                status = type(exc).__name__  # type: ignore[assignment]
            if status == 201:
                ok.append((t, time.perf_counter()))
            else:
                failures[str(status)] = failures.get(str(status), 0) + 1
                await asyncio.sleep(0.01)
            i += 1

    async def watch_leader() -> None:
        while not done.is_set():
            try:
                views = [await raft_status(session, n.base) for n in survivors]
                ids = {v.get("leader_id") for v in views}
                if len(ids) == 1 and None not in ids and leader.name not in ids:
                    leader_seen.append(time.perf_counter())
                    return
            except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
                pass
            await asyncio.sleep(0.02)

    for n in survivors:
        for k in range(4):
            await post(session, n.base, f"/fo/w{k}/")
    tasks = [asyncio.ensure_future(writer(k)) for k in range(4)]
    await asyncio.sleep(2.0)
    before = len(ok)
    assert leader.proc is not None
    kill_at.append(time.perf_counter())
    os.kill(leader.proc.pid, signal.SIGKILL)
    watcher = asyncio.ensure_future(watch_leader())
    t0 = kill_at[0]
    deadline = t0 + 30
    while time.perf_counter() < deadline:
        if any(s > t0 for s, _f in ok):
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(2.0)  # a little steady state after the recovery
    done.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    watcher.cancel()
    leader.proc.wait()
    after_start = sorted(f for s, f in ok if s > t0)
    finishes = sorted([t0] + [f for _s, f in ok])
    gaps = [b - a for a, b in itertools.pairwise(finishes) if b >= t0]
    return {
        "writes_before_kill": before,
        "first_ok_after_kill_s": (after_start[0] - t0) if after_start else None,
        "first_any_ok_after_kill_s": next(
            (f - t0 for f in sorted(f for _s, f in ok) if f > t0), None
        ),
        "longest_gap_s": max(gaps) if gaps else None,
        "new_leader_s": (leader_seen[0] - t0) if leader_seen else None,
        "failures": failures,
        "load": load(),
    }


def configure(node: ClusterNode) -> None:
    node.config["log"] = {"level": "warn", "format": "console"}


async def bench_sqlite(workdir: Path, seconds: float, clients: int) -> dict[str, Any]:
    port = free_ports(1)[0]
    base = workdir / "sqlite"
    cfg = node_config(
        "node-1",
        port,
        base,
        {"node-1": f"http://127.0.0.1:{port}"},
        {"type": "sqlite", "sqlite_path": str(base / "meta.sqlite3")},
        {"type": "local"},
    )
    node = ClusterNode("node-1", port, base, cfg)
    configure(node)
    node.start()
    out: dict[str, Any] = {}
    try:
        assert node.proc is not None
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            await mkdirs(s, node.base, clients, "b")
            cpu0 = cpu_seconds(node.proc.pid)
            out["create"], created = await creates(s, [node.base], seconds, clients, "b")
            out["create"].cpu = {"node-1": cpu_seconds(node.proc.pid) - cpu0}
            out["stat"] = await stats(s, node.base, created, seconds, clients)
            out["stat_lean"] = await lean_stats(node.base, created, seconds, clients)
            out["rss"] = {"node-1": rss_mib(node.proc.pid)}
    finally:
        node.stop()
    return out


async def bench_raft(
    workdir: Path, seconds: float, clients: int, snapshot_threshold: int = 0
) -> dict[str, Any]:
    nodes = raft_cluster(workdir / "raft")
    for n in nodes:
        configure(n)
        if snapshot_threshold:  # else the contract's default (256 entries)
            n.config["raft"]["snapshot_threshold"] = snapshot_threshold
    out: dict[str, Any] = {}
    try:
        for n in nodes:
            n.start()
        leader = await asyncio.to_thread(wait_leader, nodes)
        followers = [n for n in nodes if n is not leader]
        out["leader"] = leader.name
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            # Every node registers its endpoint at start; wait until a follower can forward.
            for _ in range(100):
                if await post(s, followers[0].base, "/b/") in (200, 201):
                    break
                await asyncio.sleep(0.1)
            await mkdirs(s, leader.base, clients, "b")
            cpu0 = {n.name: cpu_seconds(n.proc.pid) for n in nodes if n.proc}
            commits0 = {n.name: await commit_totals(s, n.base) for n in nodes}
            out["create"], created = await creates(
                s, [n.base for n in nodes], seconds, clients, "b"
            )
            out["create"].cpu = {
                n.name: cpu_seconds(n.proc.pid) - cpu0[n.name] for n in nodes if n.proc
            }
            commits = {}
            for n in nodes:
                total, count = await commit_totals(s, n.base)
                t0, c0 = commits0[n.name]
                commits[n.name] = (count - c0, (total - t0) / max(count - c0, 1) * 1e3)
            out["commits"] = commits
            out["stat"] = await stats(s, followers[0].base, created, seconds, clients)
            out["stat_leader"] = await stats(s, leader.base, created, seconds, clients)
            out["stat_lean"] = await lean_stats(followers[0].base, created, seconds, clients)
            out["rss"] = {n.name: rss_mib(n.proc.pid) for n in nodes if n.proc}
            out["status"] = await raft_status(s, leader.base)
            out["failover"] = await failover(s, leader, followers)
    finally:
        for n in nodes:
            n.stop()
    return out


def report(sq: dict[str, Any], rf: dict[str, Any], args: argparse.Namespace) -> None:
    c = args.clients
    print(f"\n## bench_raft.py: {c} clients, {args.seconds:g} s per phase, 4 KiB bodies\n")
    print("| figure | sqlite, 1 node | raft, 3 nodes | raft / sqlite |")
    print("|---|---|---|---:|")
    ratio = rf["create"].rate / sq["create"].rate if sq["create"].rate else float("nan")
    print(f"| POST 4 KiB (create) | {sq['create'].line()} | {rf['create'].line()} | {ratio:.2f}x |")
    if len(rf["create"].by_node) > 1:
        per_node = ", ".join(
            f"{k}{' (leader)' if k == rf['leader'] else ''}"
            f" p50 {pct(v, 0.5):.1f} p99 {pct(v, 0.99):.1f}"
            for k, v in sorted(rf["create"].by_node.items())
        )
        print(f"| create latency by the node a client talks to, ms | | {per_node} | |")
    print(f"| HEAD (stat), single node / follower | {sq['stat'].line()} | {rf['stat'].line()} | |")
    print(f"| HEAD (stat) on the leader | | {rf['stat_leader'].line()} | |")
    print(
        f"| HEAD (stat), single node / follower, lean raw-socket client"
        f" | {sq['stat_lean'].line()} | {rf['stat_lean'].line()} | |"
    )

    def cpu(p: Phase) -> str:
        per = {k: f"{v:.1f}s ({v / max(p.ok, 1) * 1e3:.2f} ms/create)" for k, v in p.cpu.items()}
        return ", ".join(f"{k} {v}" for k, v in per.items())

    print(f"| server CPU over the create phase | {cpu(sq['create'])} | {cpu(rf['create'])} | |")
    com = ", ".join(
        f"{k}{' (leader)' if k == rf['leader'] else ''} {n:.0f} commits, mean {ms:.1f} ms"
        for k, (n, ms) in rf["commits"].items()
    )
    print(f"| raft commits during the create phase (RaftService._commit) | | {com} | |")
    rss = ", ".join(f"{k} {v:.0f}" for k, v in rf["rss"].items())
    print(f"| server RSS after create+stat, MiB | {sq['rss']['node-1']:.0f} | {rss} | |")
    fo = rf["failover"]

    def s(v: float | None) -> str:
        return "none" if v is None else f"{v:.2f} s"

    print(
        f"| failover (kill -9 leader {rf['leader']}, 4 writers via the 2 followers) | | first "
        f"write issued after the kill OK at {s(fo['first_ok_after_kill_s'])} (first OK response "
        f"{s(fo['first_any_ok_after_kill_s'])}), new leader agreed at {s(fo['new_leader_s'])}, "
        f"longest gap between OK writes {s(fo['longest_gap_s'])}; failures {fo['failures']}; "
        f"{fo['load']} | |"
    )
    st = rf["status"]
    print(
        f"\nleader status after the stat phases: commit_index {st.get('commit_index')}, "
        f"journal_syncs {st.get('journal_syncs')}, snapshots_taken {st.get('snapshots_taken')} "
        f"(last {st.get('snapshot_seconds', 0):.2f} s)"
    )
    create_p99 = pct(rf["create"].lat, 0.99)
    stat_p99 = pct(rf["stat"].lat, 0.99)
    lean_p99 = pct(rf["stat_lean"].lat, 0.99)
    first = fo["first_ok_after_kill_s"]
    print("\n| goal | measured | target | met |")
    print("|---|---:|---:|---|")
    rows = [
        ("raft / sqlite creates/s", f"{ratio:.2f}x", ">= 0.7x", ratio >= 0.7),
        ("raft create p99", f"{create_p99:.1f} ms", "< 50 ms", create_p99 < 50),
        ("raft follower stat p99 (aiohttp client)", f"{stat_p99:.2f} ms", "< 5 ms", stat_p99 < 5),
        ("raft follower stat p99 (lean client)", f"{lean_p99:.2f} ms", "< 5 ms", lean_p99 < 5),
        (
            "failover: kill -9 leader -> first write OK",
            s(first),
            "< 5 s",
            first is not None and first < 5,
        ),
    ]
    for name, got, want, met in rows:
        print(f"| {name} | {got} | {want} | {'yes' if met else 'no'} |")


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each phase")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--workdir", default="", help="default: a new directory under /tmp/bench")
    ap.add_argument("--keep", action="store_true", help="keep the servers' data and logs")
    ap.add_argument(
        "--snapshot-threshold",
        type=int,
        default=0,
        help="raft.snapshot_threshold of the Raft nodes (default: the config default, 256)",
    )
    args = ap.parse_args()
    workdir = Path(args.workdir or f"/tmp/bench/raft-{time.strftime('%Y%m%d-%H%M%S')}")
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"workdir {workdir}; start {load()}", flush=True)
    try:
        sq = await bench_sqlite(workdir, args.seconds, args.clients)
        print(f"sqlite done; {load()}", flush=True)
        rf = await bench_raft(workdir, args.seconds, args.clients, args.snapshot_threshold)
        print(f"raft done; {load()}", flush=True)
        report(sq, rf, args)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
