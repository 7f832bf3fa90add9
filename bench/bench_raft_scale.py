"""The Raft metadata store at 1,000,000 entries (issue 11). Prints figures; not a test.

    python bench/bench_raft_scale.py [--entries 1000000] [--inflight 8] [--batch 128] [--keep]

Real ``callfs server`` processes (``cluster_tests/raftlib.raft_cluster``, three voters configured,
``log.level: warn``, the server's default ``raft.snapshot_threshold`` 256 entries unless
``--snapshot-threshold``). In order:

1. **load**: node-1 and node-2 run (a quorum of the three); ``--entries`` file entries (plus one
   directory per 1,000 files) are committed as ``batch`` log entries of ``--batch`` ``create``
   commands each - the shape ``RaftService`` group commit produces - POSTed ``--inflight`` at a
   time to the leader's ``/v1/internal/raft/metadata/apply`` (the endpoint followers forward
   to; the leader proposes each straight into the log). Every command's result is checked.
2. **after load**: RSS (VmRSS, VmHWM) of both processes; data-dir sizes (state.sqlite3 with its WAL,
   raft.journal, raft.snapshot and the retained older snapshot); the leader's snapshot figures.
3. **fresh node**: node-3 starts with an empty data dir; time until its applied index reaches the
   leader's commit index taken at its start (the leader has compacted, so this is a snapshot
   install plus the log tail), and until it answers a HEAD of the last loaded path.
4. **restart**: a follower (node-2), then the leader (node-1), each stopped with SIGTERM and
   started again on its data dir: time to ``/health``, to a HEAD of a loaded path through it (read
   barrier + local replica) and to a POST through it that commits; RSS after the restart.
5. **HTTP creates at this size**: ``--clients`` clients POST 4 KiB files through all three nodes
   for ``--http-seconds`` (as ``bench_raft.py`` does on an empty cluster), with the snapshots the
   leader takes meanwhile (each one copies the whole database).

``--entries 100000`` is the quick check (well under a minute).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from callfs.metadata import raft_commands as C
from callfs.model import BackendType, Entry, EntryType, NewParents
from cluster_tests.harness import API_KEY, INTERNAL, ClusterNode
from cluster_tests.raftlib import raft_cluster, wait_leader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_raft import creates, mkdirs, pct  # the same create phase as on an empty cluster

H = {"Authorization": f"Bearer {API_KEY}"}
HI = {"Authorization": f"Bearer {INTERNAL}"}
APPLY = "/v1/internal/raft/metadata/apply"
PER_DIR = 1000
NOW = 1_700_000_000


def load() -> str:
    with open("/proc/loadavg") as f:
        return "load " + " ".join(f.read().split()[:3])


def proc_mem(pid: int) -> dict[str, float]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(line.split()[1]) / 1024
    return out


def mem_text(node: ClusterNode) -> str:
    assert node.proc is not None
    m = proc_mem(node.proc.pid)
    return f"RSS {m.get('VmRSS', 0):.0f} MiB (peak {m.get('VmHWM', 0):.0f})"


def mib(path: Path) -> float:
    return path.stat().st_size / 2**20 if path.exists() else 0.0


def sizes(node: ClusterNode) -> str:
    d = Path(node.config["raft"]["data_dir"])
    db = mib(d / "state.sqlite3") + mib(d / "state.sqlite3-wal")
    snaps = sorted(p for p in d.glob("raft.snapshot*") if not p.name.endswith("tmp"))
    snap = " + ".join(f"{mib(p):.0f}" for p in snaps) or "0"
    return (
        f"state.sqlite3 {db:.0f} MiB (incl. WAL {mib(d / 'state.sqlite3-wal'):.0f}), "
        f"raft.journal {mib(d / 'raft.journal'):.0f} MiB, raft.snapshot* {snap} MiB "
        f"({len(snaps)} file(s))"
    )


def file_entry(path: str) -> Entry:
    return Entry(
        path=path,
        type=EntryType.FILE,
        size=4096,
        owner="alice",
        mtime=NOW,
        backend_type=BackendType.LOCALFS,
        instance_id="node-1",
        created_at=NOW,
        blob_key=uuid.uuid5(uuid.NAMESPACE_URL, path).hex,
    )


PARENTS = C.parents_out(NewParents("alice", NOW, BackendType.LOCALFS, None))


def path_of(i: int) -> str:
    return f"/scale/d{i // PER_DIR:04d}/f{i % PER_DIR:04d}"


async def status(session: aiohttp.ClientSession, node: ClusterNode) -> dict[str, Any]:
    async with session.get(
        node.base + "/v1/internal/raft/status", headers=HI, timeout=aiohttp.ClientTimeout(total=5)
    ) as r:
        out: dict[str, Any] = await r.json()
        return out


async def load_entries(
    session: aiohttp.ClientSession, leader: ClusterNode, n: int, batch: int, inflight: int
) -> tuple[float, int]:
    """Commit n creates through the leader; (seconds, log entries)."""
    queue = list(range(0, n, batch))
    queue.reverse()
    entries = 0
    progress = {"done": 0, "next": 100_000}
    start = time.perf_counter()

    async def worker() -> None:
        nonlocal entries
        while queue:
            first = queue.pop()
            now = time.time()
            items = [  # whole commands, each with its own request id (what group commit sends)
                C.command(
                    uuid.uuid4().hex, now, "create", [C.entry_out(file_entry(path_of(i))), PARENTS]
                )
                for i in range(first, min(first + batch, n))
            ]
            cmd = C.command("", now, "batch", items)
            for attempt in range(50):  # the items' request ids make a retry safe
                try:
                    async with session.post(
                        leader.base + APPLY,
                        data=C.pack({"op": "apply", "cmd": cmd}),
                        headers={**HI, "Content-Type": "application/x-msgpack"},
                        timeout=aiohttp.ClientTimeout(total=30),
                    ) as r:
                        raw = await r.read()
                        code = r.status
                except (aiohttp.ClientError, TimeoutError) as exc:
                    code, raw = 0, repr(exc).encode()
                if code == 200:
                    break
                if attempt == 49:
                    raise SystemExit(f"apply failed {code}: {raw[:300]!r}")
                await asyncio.sleep(0.2)
            results = C.result(C.unpack(raw)["result"])
            bad = [C.unpack(x) for x in results if not C.unpack(x)[0]]
            if bad:
                raise SystemExit(f"create refused: {bad[:3]}")
            entries += 1
            progress["done"] += len(items)
            if progress["done"] >= progress["next"]:
                progress["next"] += 100_000
                el = time.perf_counter() - start
                print(
                    f"  loaded {progress['done']:,} in {el:.1f} s "
                    f"({progress['done'] / el:,.0f}/s; {load()})",
                    flush=True,
                )

    await asyncio.gather(*(worker() for _ in range(inflight)))
    return time.perf_counter() - start, entries


async def wait_applied(
    session: aiohttp.ClientSession, node: ClusterNode, target: int, timeout: float
) -> float | None:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        try:
            st = await status(session, node)
            if (st.get("applied_index") or 0) >= target:
                return time.perf_counter() - t0
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
            pass
        await asyncio.sleep(0.05)
    return None


async def until_ok(
    session: aiohttp.ClientSession, method: str, url: str, timeout: float, body: bytes = b""
) -> float | None:
    """Seconds until ``method url`` answers 200/201 (retried), None on timeout."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        try:
            async with session.request(
                method,
                url,
                data=body or None,
                headers=H,
                timeout=aiohttp.ClientTimeout(total=max(1.0, timeout)),
            ) as r:
                await r.read()
                if r.status in (200, 201):
                    return time.perf_counter() - t0
        except (aiohttp.ClientError, TimeoutError, OSError):
            pass
        await asyncio.sleep(0.02)
    return None


def start_in_thread(node: ClusterNode, timeout: float) -> tuple[threading.Thread, list[float]]:
    """``node.start`` (waits for /health) in a thread; the list gets the seconds to health."""
    out: list[float] = []

    def run() -> None:
        t0 = time.perf_counter()
        node.start(timeout)
        out.append(time.perf_counter() - t0)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th, out


async def restart(
    session: aiohttp.ClientSession, node: ClusterNode, probe: str, tag: str
) -> dict[str, Any]:
    t0 = time.perf_counter()
    node.stop(signal.SIGTERM)
    stopped = time.perf_counter() - t0
    t1 = time.perf_counter()
    th, health = start_in_thread(node, 300)
    await asyncio.to_thread(th.join)
    if not health:
        raise SystemExit(f"{node.name} did not restart:\n{node.logs()}")
    read = await until_ok(session, "HEAD", node.base + "/v1/files" + probe, 60)
    read_at = time.perf_counter() - t1
    write = await until_ok(session, "POST", node.base + f"/v1/files/restart-{tag}", 60, b"x" * 4096)
    write_at = time.perf_counter() - t1
    return {
        "stop": stopped,
        "health": health[0],
        "read": read_at if read is not None else None,
        "write": write_at if write is not None else None,
        "mem": mem_text(node),
        "load": load(),
    }


def fmt(v: float | None) -> str:
    return "timed out" if v is None else f"{v:.2f} s"


async def run(args: argparse.Namespace, workdir: Path) -> None:
    nodes = raft_cluster(workdir)
    for n in nodes:
        n.config["log"] = {"level": "warn", "format": "console"}
        n.config["raft"]["apply_timeout"] = "30s"
        n.config["raft"]["forward_timeout"] = "30s"
        if args.snapshot_threshold:
            n.config["raft"]["snapshot_threshold"] = args.snapshot_threshold
        if args.snapshot_interval:
            n.config["raft"]["snapshot_interval"] = args.snapshot_interval
    n1, n2, n3 = nodes
    threshold = n1.config["raft"].get("snapshot_threshold", 256)
    print(
        f"workdir {workdir}; {args.entries:,} entries, batch {args.batch}, {args.inflight} in "
        f"flight, snapshot_threshold {threshold}; start {load()}",
        flush=True,
    )
    try:
        n1.start()
        n2.start()
        leader = await asyncio.to_thread(wait_leader, [n1, n2], 30.0, {"node-3"})
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            # ---- 1. load
            seconds, log_entries = await load_entries(
                s, leader, args.entries, args.batch, args.inflight
            )
            rate = args.entries / seconds
            load_after = load()
            st = await status(s, leader)
            print(
                f"\nload: {args.entries:,} creates in {seconds:.1f} s = {rate:,.0f} creates/s "
                f"({log_entries:,} log entries of <= {args.batch}); {load_after}"
            )
            # the snapshot running at the end of the load (if any) finishes
            taken = st["snapshots_taken"]
            for _ in range(100):
                await asyncio.sleep(0.2)
                st = await status(s, leader)
                if st["snapshots_taken"] == taken:
                    break
                taken = st["snapshots_taken"]
            follower = n2 if leader is n1 else n1
            fst = await status(s, follower)
            print(
                f"leader {leader.name}: commit_index {st['commit_index']}, log_len "
                f"{st['log_len']}, snapshots_taken {st['snapshots_taken']} (last took "
                f"{st['snapshot_seconds']:.2f} s), journal_syncs {st['journal_syncs']}; "
                f"follower {follower.name}: snapshots_taken {fst['snapshots_taken']}, "
                f"journal_syncs {fst['journal_syncs']}"
            )
            for n in (leader, follower):
                print(f"after load, {n.name}: {mem_text(n)}; {sizes(n)}")

            # ---- 3. fresh node
            target = int((await status(s, leader))["commit_index"])
            t0 = time.perf_counter()
            th, health = start_in_thread(n3, 300)
            caught = await wait_applied(s, n3, target, 600)
            caught_at = time.perf_counter() - t0 if caught is not None else None
            await asyncio.to_thread(th.join)
            probe = path_of(args.entries - 1)
            head = await until_ok(s, "HEAD", n3.base + "/v1/files" + probe, 60)
            head_at = time.perf_counter() - t0 if head is not None else None
            st3 = await status(s, n3)
            print(
                f"\nfresh node-3 (empty data dir; leader commit index {target}): /health "
                f"{fmt(health[0] if health else None)}, applied >= leader commit "
                f"{fmt(caught_at)}, HEAD {probe} 200 {fmt(head_at)}; applied_index "
                f"{st3['applied_index']}, {mem_text(n3)}; {sizes(n3)}; {load()}"
            )

            # ---- 4. restarts
            for node, role in ((follower, "follower"), (leader, "leader")):
                r = await restart(s, node, path_of(0), node.name)
                print(
                    f"restart {node.name} ({role} at load time): SIGTERM stop {r['stop']:.2f} s; "
                    f"start -> /health {r['health']:.2f} s, -> HEAD of a loaded path 200 "
                    f"{fmt(r['read'])}, -> POST through it 201 {fmt(r['write'])}; "
                    f"after restart {r['mem']}; {r['load']}"
                )
            new_leader = await asyncio.to_thread(wait_leader, nodes, 30.0)

            # ---- 5. HTTP creates on the loaded cluster
            if args.http_seconds > 0:
                await mkdirs(s, new_leader.base, args.clients, "h")
                before = await status(s, new_leader)
                phase, _created = await creates(
                    s, [n.base for n in nodes], args.http_seconds, args.clients, "h"
                )
                after = await status(s, new_leader)
                err = f", errors {phase.errors}" if phase.errors else ""
                print(
                    f"HTTP POST 4 KiB at {args.entries:,} entries, {args.clients} clients over "
                    f"the 3 nodes, {args.http_seconds:g} s: {phase.rate:,.0f} creates/s, p50 "
                    f"{pct(phase.lat, 0.5):.1f} p99 {pct(phase.lat, 0.99):.1f} ms ({phase.ok} "
                    f"ok{err}); log entries {after['commit_index'] - before['commit_index']}, "
                    f"leader {new_leader.name} snapshots during it "
                    f"{after['snapshots_taken'] - before['snapshots_taken']} (last took "
                    f"{after['snapshot_seconds']:.2f} s); {phase.load}"
                )
            fin = await status(s, new_leader)
            print(
                f"end: leader {new_leader.name}, commit_index {fin['commit_index']}, "
                f"snapshots_taken {fin['snapshots_taken']}; {load()}"
            )
    finally:
        for n in nodes:
            n.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=128, help="create commands per log entry")
    ap.add_argument("--inflight", type=int, default=8, help="log entries proposed at once")
    ap.add_argument("--http-seconds", type=float, default=10.0, help="0 skips phase 5")
    ap.add_argument("--clients", type=int, default=16, help="HTTP clients in phase 5")
    ap.add_argument("--snapshot-threshold", type=int, default=0, help="default: the server's")
    ap.add_argument("--snapshot-interval", default="", help='e.g. "60s"; default: the server\'s')
    ap.add_argument("--workdir", default="", help="default: a new directory under /tmp/bench")
    ap.add_argument("--keep", action="store_true", help="keep the data dirs and logs")
    args = ap.parse_args()
    workdir = Path(args.workdir or f"/tmp/bench/raft-scale-{time.strftime('%Y%m%d-%H%M%S')}")
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        asyncio.run(run(args, workdir))
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
