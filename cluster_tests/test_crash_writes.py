"""Crash safety of writes: one real ``callfs server`` (SQLite metadata, localfs bytes) is killed
with SIGKILL while concurrent PUT/POST/PATCH/DELETE requests are in flight, restarted on the same
data, and checked against a client-side model after every restart and once more at the end.

Invariants (see ``crashlib`` for the model):
- every acknowledged (2xx) write is present with exactly its bytes, every acknowledged delete and
  rename stuck, unless a later operation on the path was in flight at a crash; then the joint state
  of the paths that operation touches is either the state before it or its complete result;
- every file readable through the API is a whole version (header parses, sha256 matches), its
  listed size is its length, and the recursive listing shows nothing the model cannot explain.
Orphan bytes on disk are allowed. Seed: ``CRASH_WRITES_SEED=<n>`` reruns the same op choices.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import random
import time
from pathlib import Path

import aiohttp
import pytest

from cluster_tests.crashlib import Model, Op, Version, make_body, parse_body
from cluster_tests.harness import API_KEY, ClusterNode, free_ports, node_config

pytestmark = pytest.mark.slow
H = {"Authorization": f"Bearer {API_KEY}"}
TOTAL_OPS = 200
CRASHES = 3
WORKERS = 6
OP_PHASE_BUDGET = 150.0  # seconds of client operations at most; the rest is restarts and checks
MIB = 1024 * 1024
DIRS = ["/crash/d0", "/crash/d1", "/crash/d2"]
NAMES = [f"f{i}.bin" for i in range(8)]
CORRUPT = "<corrupt>"  # an observation that is no whole version
NET_ERRORS = (aiohttp.ClientError, TimeoutError, ConnectionError)


def payload_size(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.3:
        return rng.randint(0, 4096)
    if r < 0.65:
        return rng.randint(4097, 256 * 1024)
    return rng.randint(256 * 1024, 3 * MIB)


class Runner:
    def __init__(self, node: ClusterNode, seed: int) -> None:
        self.node = node
        self.seed = seed
        self.rng = random.Random(seed)
        self.model = Model([f"{d}/{n}" for d in DIRS for n in NAMES])
        self.timeout = aiohttp.ClientTimeout(total=60)
        self.session = aiohttp.ClientSession(timeout=self.timeout)
        self.up = asyncio.Event()
        self.up.set()
        self.crashing = False
        self.claimed: set[str] = set()
        self.active = 0
        self.live_workers = 0
        self.started = 0
        self.planned = 0
        self.deadline = time.monotonic() + OP_PHASE_BUDGET
        self.stats = {
            "acked": 0,
            "rejected_as_expected": 0,
            "in_flight_at_crash": 0,
            "lost_without_crash": 0,
            "pending_applied": 0,
            "pending_not_applied": 0,
        }
        self.by_kind: dict[str, int] = {}
        self.active_at_kill: list[int] = []
        self.crashes = 0
        self.anomalies: list[str] = []
        self._reported: set[tuple[str, str]] = set()

    # ---- reporting -----------------------------------------------------------------------
    def report(self, label: str, key: str, msg: str, paths: tuple[str, ...] = ()) -> None:
        """Record a violation once per (path/op, message) across verifications."""
        if (key, msg) in self._reported:
            self.model.tainted.update(paths)
            return
        self._reported.add((key, msg))
        self.model.violation(f"[{label}] {msg}", paths)

    # ---- choosing operations -------------------------------------------------------------
    def plan(self) -> tuple[Op, bytes | None, str | None] | None:
        m, rng = self.model, self.rng
        free = [p for p in m.paths if p not in self.claimed and p not in m.tainted]
        if not free:
            return None
        present = [p for p in free if m.state[p] is not None]
        absent = [p for p in free if m.state[p] is None]
        self.planned += 1
        version = f"{self.seed}-{self.planned}"
        r = rng.random()
        op: Op | None = None
        body: bytes | None = None
        new_name: str | None = None
        if 0.45 <= r < 0.60:
            path = rng.choice(absent) if absent and rng.random() < 0.85 else rng.choice(free)
            exists = m.state[path] is not None
            after = m.state[path] if exists else version
            op = Op("POST", (path,), {path: m.state[path]}, {path: after}, 409 if exists else 201)
        elif 0.60 <= r < 0.80 and present:
            src = rng.choice(present)
            parent = src.rsplit("/", 1)[0]
            targets = [p for p in absent if p.rsplit("/", 1)[0] == parent]
            if targets:
                dst = rng.choice(targets)
                new_name = dst.rsplit("/", 1)[1]
                before = {src: m.state[src], dst: None}
                op = Op("PATCH", (src, dst), before, {src: None, dst: m.state[src]}, 200)
        elif r >= 0.80 and present:
            path = rng.choice(present) if not absent or rng.random() < 0.9 else rng.choice(absent)
            exists = m.state[path] is not None
            op = Op("DELETE", (path,), {path: m.state[path]}, {path: None}, 204 if exists else 404)
        if op is None:  # PUT, also the fallback when the chosen kind has no candidate
            path = rng.choice(free)
            exists = m.state[path] is not None
            op = Op("PUT", (path,), {path: m.state[path]}, {path: version}, 200 if exists else 201)
        if op.kind in ("PUT", "POST"):
            body = make_body(op.paths[0], version, payload_size(rng))
            m.versions[version] = hashlib.sha256(body).hexdigest()
        self.claimed.update(op.paths)
        return op, body, new_name

    # ---- running them --------------------------------------------------------------------
    async def send(self, op: Op, body: bytes | None, new_name: str | None) -> int:
        url = f"{self.node.base}/v1/files{op.paths[0]}"
        s = self.session
        if op.kind == "PUT":
            ctx = s.put(url, data=io.BytesIO(body or b""), headers=H)
        elif op.kind == "POST":
            ctx = s.post(url, data=io.BytesIO(body or b""), headers=H)
        elif op.kind == "PATCH":
            ctx = s.patch(url, json={"name": new_name}, headers=H)
        else:
            ctx = s.delete(url, headers=H)
        async with ctx as r:
            await r.read()
            return r.status

    async def worker(self) -> None:
        self.live_workers += 1
        try:
            await self._work()
        finally:
            self.live_workers -= 1

    async def _work(self) -> None:
        while self.started < TOTAL_OPS and time.monotonic() < self.deadline:
            while not self.up.is_set():
                await self.up.wait()
            planned = self.plan()
            if planned is None:
                if self.model.tainted.issuperset(self.model.paths):
                    return  # every path already failed a check: nothing left to learn
                await asyncio.sleep(0.01)
                continue
            op, body, new_name = planned
            self.started += 1
            op.seq = self.started
            self.by_kind[op.kind] = self.by_kind.get(op.kind, 0) + 1
            self.active += 1
            status: int | None = None
            error = ""
            try:
                status = await self.send(op, body, new_name)
            except NET_ERRORS as exc:
                error = repr(exc)
            finally:
                self.active -= 1
            self.settle(op, status, error)

    def settle(self, op: Op, status: int | None, error: str) -> None:
        m = self.model
        if status is None:
            # Outcome unknown: either state is acceptable until the next verification decides.
            m.pending.append(op)
            if self.crashing:
                self.stats["in_flight_at_crash"] += 1
            else:
                self.stats["lost_without_crash"] += 1
                self.anomalies.append(f"op#{op.seq} {op.kind} {op.paths} failed: {error}")
            return  # its paths stay claimed until resolved
        if status == op.expect:
            if 200 <= status < 300:
                m.acked(op)
                self.stats["acked"] += 1
            else:
                self.stats["rejected_as_expected"] += 1
        else:
            self.report(
                "run",
                f"op#{op.seq}",
                f"op#{op.seq} {op.kind} {op.paths}: status {status}, the model predicted "
                f"{op.expect} from state {op.before}",
                op.paths,
            )
        self.claimed.difference_update(op.paths)

    async def crasher(self) -> None:
        points = sorted(self.rng.sample(range(15, TOTAL_OPS - 15), CRASHES))
        for i, point in enumerate(points, 1):
            while self.started < point:
                if time.monotonic() >= self.deadline or (self.started and not self.live_workers):
                    return
                await asyncio.sleep(0.005)
            await asyncio.sleep(self.rng.uniform(0.0, 0.08))
            self.crashing = True
            self.up.clear()
            self.active_at_kill.append(self.active)
            await asyncio.to_thread(self.node.kill)
            self.crashes += 1
            while self.active:
                await asyncio.sleep(0.01)
            await self.restart()
            await self.verify(f"after crash {i}")
            self.crashing = False
            self.up.set()

    async def restart(self) -> None:
        await asyncio.to_thread(self.node.start)
        old, self.session = self.session, aiohttp.ClientSession(timeout=self.timeout)
        await old.close()  # its pooled connections died with the server

    # ---- checking ------------------------------------------------------------------------
    async def observe(self, label: str, path: str, listed: dict[str, int]) -> Version | None:
        async with self.session.get(f"{self.node.base}/v1/files{path}", headers=H) as r:
            status = r.status
            body = await r.read()
        if status == 404:
            if path in listed:
                self.report(label, path, f"{path} is listed but GET answers 404", (path,))
                return CORRUPT
            return None
        if status != 200:
            self.report(label, path, f"GET {path} -> {status}: {body[:200]!r}", (path,))
            return CORRUPT
        obs: Version | None
        version, why = parse_body(body)
        if version is None:
            self.report(label, path, f"{path} is readable but not a whole version: {why}", (path,))
            obs = CORRUPT
        elif version not in self.model.versions:
            self.report(label, path, f"{path} holds unknown version {version}", (path,))
            obs = CORRUPT
        elif hashlib.sha256(body).hexdigest() != self.model.versions[version]:
            self.report(label, path, f"{path}: bytes differ from version {version}", (path,))
            obs = CORRUPT
        else:
            obs = version
        if path not in listed:
            self.report(label, path, f"{path} is readable but not in the listing", (path,))
        elif listed[path] != len(body):
            self.report(
                label,
                path,
                f"{path}: listed size {listed[path]} but GET returned {len(body)} bytes "
                f"(parsed as {version or why})",
                (path,),
            )
        return obs

    async def verify(self, label: str) -> None:
        m = self.model
        url = f"{self.node.base}/v1/directories/?recursive=true"
        async with self.session.get(url, headers=H) as r:
            assert r.status == 200, (label, r.status, await r.text())
            listing = await r.json()
        listed = {i["path"]: int(i["size"]) for i in listing["items"] if i["type"] == "file"}
        known_dirs = {"/crash", *DIRS}
        for item in listing["items"]:
            if item["type"] != "file" and item["path"] not in known_dirs:
                self.report(label, item["path"], f"unexplained listed {item['type']} {item}")
        for path in sorted(set(listed) - set(m.paths)):
            self.report(label, path, f"listing shows {path}, which no operation ever wrote")
        observed = {p: await self.observe(label, p, listed) for p in m.paths}

        in_pending: set[str] = set()
        for op in m.pending:
            got = {p: observed[p] for p in op.paths}
            in_pending.update(op.paths)
            if got == op.before:
                self.stats["pending_not_applied"] += 1
            elif got == op.after:
                self.stats["pending_applied"] += 1
            else:
                self.report(
                    label,
                    f"op#{op.seq}",
                    f"op#{op.seq} {op.kind} {op.paths} was in flight at a crash and left "
                    f"{got}; acceptable: before {op.before} or after {op.after}",
                    op.paths,
                )
            self.claimed.difference_update(op.paths)
        for p in m.paths:
            if p in in_pending or p in m.tainted:
                continue
            if observed[p] != m.state[p]:
                self.report(
                    label,
                    p,
                    f"{p} is {observed[p]} but its last acknowledged state is {m.state[p]} "
                    "and nothing was in flight on it",
                    (p,),
                )
        for p in m.paths:  # collapse: what is there now is the new exact state
            m.state[p] = observed[p] if observed[p] != CORRUPT else m.state[p]
        m.pending.clear()

    async def run(self) -> None:
        try:
            await asyncio.gather(self.crasher(), *(self.worker() for _ in range(WORKERS)))
            # Final round: the node is idle; kill it once more, restart and check everything.
            await asyncio.to_thread(self.node.kill)
            await self.restart()
            await self.verify("final")
        finally:
            await self.session.close()

    def summary(self, elapsed: float) -> str:
        lines = [
            f"crash-writes summary (seed {self.seed}, {elapsed:.1f}s)",
            f"  operations started: {self.started} {dict(sorted(self.by_kind.items()))}",
            f"  acked: {self.stats['acked']}, rejected as predicted (409/404): "
            f"{self.stats['rejected_as_expected']}",
            f"  crashes (SIGKILL mid-load): {self.crashes}, requests active at each kill: "
            f"{self.active_at_kill}",
            f"  in flight at crash (outcome unknown): {self.stats['in_flight_at_crash']} -> "
            f"took effect {self.stats['pending_applied']}, did not "
            f"{self.stats['pending_not_applied']}",
            f"  failed without a crash: {self.stats['lost_without_crash']}",
            f"  violations: {len(self.model.violations)}",
        ]
        lines += [f"    - {v}" for v in self.model.violations]
        lines += [f"  anomaly: {a}" for a in self.anomalies]
        return "\n".join(lines)


@pytest.mark.timeout(235)
async def test_acknowledged_writes_survive_sigkill(tmp_path: Path) -> None:
    seed = int(os.environ.get("CRASH_WRITES_SEED") or random.SystemRandom().randrange(1 << 32))
    print(f"\ncrash-writes seed={seed} (rerun: CRASH_WRITES_SEED={seed})")
    port = free_ports(1)[0]
    metadata = {"type": "sqlite", "sqlite_path": str(tmp_path / "metadata.sqlite3")}
    config = node_config("solo", port, tmp_path, {}, metadata, {"type": "local"})
    node = ClusterNode("solo", port, tmp_path, config)
    started = time.monotonic()
    await asyncio.to_thread(node.start)
    runner = Runner(node, seed)
    try:
        await runner.run()
    finally:
        await asyncio.to_thread(node.stop)
        print(runner.summary(time.monotonic() - started))
    assert not runner.model.violations, "\n".join(runner.model.violations)
    assert runner.crashes == CRASHES, "the op budget ran out before every crash round"
