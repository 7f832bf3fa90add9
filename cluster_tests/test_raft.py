"""A three-node Raft cluster of real ``callfs server`` processes (issue 11): read-your-writes from
every node, leader loss, follower catch-up by log and by snapshot, a whole-cluster kill -9, a
frozen leader, no quorum, and concurrent creates decided once."""

from __future__ import annotations

import concurrent.futures
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster_tests.harness import ClusterNode
from cluster_tests.raftlib import H, raft_cluster, raft_status, wait_leader

pytestmark = pytest.mark.slow


def call(
    node: ClusterNode, method: str, path: str, body: bytes | None = None, timeout: float = 15.0
) -> tuple[int, bytes]:
    req = urllib.request.Request(node.base + path, data=body, method=method, headers=H)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def put(node: ClusterNode, path: str, body: bytes) -> int:
    return call(node, "PUT", "/v1/files" + path, body)[0]


def get(node: ClusterNode, path: str) -> tuple[int, bytes]:
    return call(node, "GET", "/v1/files" + path)


def until(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def listing(node: ClusterNode, path: str = "/") -> list[tuple[str, int]]:
    import json

    status, raw = call(node, "GET", "/v1/directories" + path)
    assert status == 200, (status, raw)
    return sorted((i["name"], i["size"]) for i in json.loads(raw)["items"])


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[ClusterNode]]:
    nodes = raft_cluster(tmp_path)
    for node in nodes:
        node.config["raft"]["snapshot_threshold"] = 40
    try:
        for node in nodes:
            node.start()
        wait_leader(nodes)
        yield nodes
    finally:
        for node in nodes:
            node.stop()


def test_read_your_writes_from_every_node_to_every_other(cluster: list[ClusterNode]) -> None:
    for i, writer in enumerate(cluster):
        assert put(writer, f"/ryw/{i}.txt", b"v1-%d" % i) == 201
        for reader in cluster:
            assert get(reader, f"/ryw/{i}.txt") == (200, b"v1-%d" % i), reader.name
        # an overwrite through another node is seen at once everywhere too
        other = cluster[(i + 1) % len(cluster)]
        assert put(other, f"/ryw/{i}.txt", b"v2-%d" % i) == 200
        for reader in cluster:
            assert get(reader, f"/ryw/{i}.txt") == (200, b"v2-%d" % i), reader.name
            status, _ = call(reader, "HEAD", f"/v1/files/ryw/{i}.txt")
            assert status == 200
    for reader in cluster:
        assert listing(reader, "/ryw") == [(f"{i}.txt", 4) for i in range(3)]
    # a delete through one node: gone on every node
    assert call(cluster[2], "DELETE", "/v1/files/ryw/0.txt")[0] == 204
    for reader in cluster:
        assert get(reader, "/ryw/0.txt")[0] == 404
    # the followers asked the leader (commands, read indexes) over their channel, never by POST
    for node in cluster:
        status = raft_status(node)
        if status["state"] != "leader":
            assert status["forwards"]["channel"] > 0, (node.name, status["forwards"])
            assert status["forwards"]["post"] == 0, (node.name, status["forwards"])


def test_concurrent_creates_of_one_path_through_three_nodes(cluster: list[ClusterNode]) -> None:
    for round_ in range(3):
        path = f"/race-{round_}.txt"

        def create(i: int, path: str = path) -> int:
            return call(cluster[i % 3], "POST", "/v1/files" + path, b"writer-%d" % i)[0]

        with concurrent.futures.ThreadPoolExecutor(9) as pool:
            statuses = list(pool.map(create, range(9)))
        assert sorted(statuses).count(201) == 1, statuses
        assert all(s in (201, 409) for s in statuses), statuses
        bodies = {get(n, path)[1] for n in cluster}
        assert len(bodies) == 1 and next(iter(bodies)).startswith(b"writer-")


def test_links_are_redeemed_once_across_nodes(cluster: list[ClusterNode]) -> None:
    import json

    assert put(cluster[0], "/shared.txt", b"share me") == 201
    status, raw = call(
        cluster[1],
        "POST",
        "/v1/links/generate",
        json.dumps({"path": "/shared.txt", "expiry_seconds": 60}).encode(),
    )
    assert status == 201, raw
    token = json.loads(raw)["url"].rsplit("/", 1)[1]

    def redeem(i: int) -> int:
        req = urllib.request.Request(cluster[i % 3].base + f"/download/{token}")
        try:
            with urllib.request.urlopen(req, timeout=15) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        statuses = list(pool.map(redeem, range(6)))
    assert statuses.count(200) == 1, statuses


def test_leader_kill_elects_a_new_leader_and_writes_resume(cluster: list[ClusterNode]) -> None:
    leader = wait_leader(cluster)
    survivors = [n for n in cluster if n is not leader]
    for i in range(10):
        assert put(survivors[i % 2], f"/before/{i}", b"x%d" % i) == 201
    killed = time.monotonic()
    leader.kill()
    # the first write that succeeds after the kill, through a survivor
    deadline = killed + 15
    while True:
        status = put(survivors[0], "/after/first", b"first")
        if status in (200, 201):
            break
        assert status == 503, status
        assert time.monotonic() < deadline, "no write succeeded within 15 s of the leader kill"
    failover = time.monotonic() - killed
    print(f"failover to first successful write: {failover:.2f}s")
    assert failover < 5.0
    new_leader = wait_leader(cluster, exclude={leader.name})
    assert new_leader is not leader
    for node in survivors:
        for i in range(10):
            assert get(node, f"/before/{i}") == (200, b"x%d" % i)
    # the old leader comes back as a follower and catches up
    leader.start()
    until(lambda: get(leader, "/after/first") == (200, b"first"), 20, "restarted node catch-up")
    assert wait_leader(cluster).name == new_leader.name


def test_follower_restart_catches_up_by_snapshot(cluster: list[ClusterNode]) -> None:
    leader = wait_leader(cluster)
    follower = next(n for n in cluster if n is not leader)
    other = next(n for n in cluster if n is not leader and n is not follower)
    assert put(leader, "/snap/early", b"early") == 201
    follower.kill()
    # far more commands than snapshot_threshold (40): the others compact their logs
    for i in range(150):
        assert put(other if i % 2 else leader, f"/snap/{i}", b"%d" % i) == 201
    until(
        lambda: all(
            raft_status(n)["snapshots_taken"] > raft_status(n)["snapshot_copies"] >= 1
            for n in (leader, other)
        ),
        30,
        "snapshots on the live nodes, some of them delta records after a copy",
    )
    follower.start()
    until(
        lambda: raft_status(follower)["applied_index"] >= raft_status(leader)["commit_index"],
        30,
        "the restarted follower to catch up",
    )
    assert get(follower, "/snap/early") == (200, b"early")
    for i in (0, 77, 149):
        assert get(follower, f"/snap/{i}") == (200, b"%d" % i)
    assert listing(follower, "/snap") == listing(leader, "/snap")
    assert raft_status(follower)["broken"] is None


def test_whole_cluster_kill_9_keeps_every_acknowledged_write(
    cluster: list[ClusterNode],
) -> None:
    acked: dict[str, bytes] = {}

    def writer(i: int) -> None:
        node = cluster[i % 3]
        for j in range(25):
            path = f"/crash/{i}-{j}"
            body = b"%d-%d" % (i, j)
            try:
                status = put(node, path, body)
            except OSError:
                return
            if status == 201:
                acked[path] = body

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(writer, i) for i in range(6)]
        time.sleep(1.0)
        for node in cluster:  # all at once, mid-stream
            node.kill()
        for f in futures:
            f.result()
    assert len(acked) > 10
    for node in cluster:
        node.start()
    wait_leader(cluster)
    for path, body in acked.items():
        for node in cluster:
            status, got = get(node, path)
            assert (status, got) == (200, body), (node.name, path, status)
    views = [listing(node, "/crash") for node in cluster]
    assert views[0] == views[1] == views[2]


def test_frozen_leader_does_not_split_the_brain(cluster: list[ClusterNode]) -> None:
    import signal

    leader = wait_leader(cluster)
    others = [n for n in cluster if n is not leader]
    assert leader.proc is not None
    leader.proc.send_signal(signal.SIGSTOP)
    try:
        new_leader = wait_leader(others, timeout=15)
        assert put(new_leader, "/frozen/while", b"while frozen") == 201
        for i in range(5):
            assert put(others[i % 2], f"/frozen/{i}", b"%d" % i) == 201
    finally:
        leader.proc.send_signal(signal.SIGCONT)
    # the old leader steps down; nothing it thought it led is lost or duplicated
    final = wait_leader(cluster, timeout=15)
    assert final.name == new_leader.name
    until(lambda: get(leader, "/frozen/while") == (200, b"while frozen"), 15, "old leader sync")
    expected = sorted([(str(i), 1) for i in range(5)] + [("while", 12)])
    for node in cluster:
        assert listing(node, "/frozen") == expected, node.name


def test_followers_turn_to_the_new_leader_instead_of_waiting_on_a_frozen_one(
    tmp_path: Path,
) -> None:
    """Reads and writes a follower sent to the leader just before it froze are asked again of
    the new leader once it is elected: they do not wait out ``raft.forward_timeout`` (30 s
    here, far above an election)."""
    import signal

    nodes = raft_cluster(tmp_path)
    for node in nodes:
        node.config["raft"]["apply_timeout"] = "30s"
        node.config["raft"]["forward_timeout"] = "30s"
    try:
        for node in nodes:
            node.start()
        leader = wait_leader(nodes)
        others = [n for n in nodes if n is not leader]
        assert put(others[0], "/thaw/seed", b"seed") == 201
        assert get(others[1], "/thaw/seed") == (200, b"seed")
        assert leader.proc is not None

        def timed(
            node: ClusterNode, method: str, path: str, body: bytes | None
        ) -> tuple[int, bytes, float]:
            started = time.monotonic()
            status, raw = call(node, method, path, body, timeout=60)
            return status, raw, time.monotonic() - started

        leader.proc.send_signal(signal.SIGSTOP)
        try:
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                jobs = [
                    pool.submit(timed, node, "GET", "/v1/files/thaw/seed", None)
                    for node in others
                    for _ in range(2)
                ] + [
                    pool.submit(timed, node, "PUT", f"/v1/files/thaw/{node.name}-{i}", b"%d" % i)
                    for node in others
                    for i in range(2)
                ]
                results = [job.result() for job in jobs]
            new_leader = wait_leader(others, timeout=15)
        finally:
            leader.proc.send_signal(signal.SIGCONT)
        assert [r[0] for r in results] == [200] * 4 + [201] * 4, results
        assert [r[1] for r in results[:4]] == [b"seed"] * 4
        # an election takes a few seconds at most; 30 s would mean a wait on the frozen leader
        assert max(r[2] for r in results) < 12.0, results
        assert len(listing(new_leader, "/thaw")) == 5
    finally:
        for node in nodes:
            node.stop()


def test_no_quorum_answers_503_quickly_and_recovers(cluster: list[ClusterNode]) -> None:
    leader = wait_leader(cluster)
    assert put(leader, "/q/before", b"before") == 201
    survivor = cluster[0] if cluster[0] is not leader else cluster[1]
    down = [n for n in cluster if n is not survivor]
    for node in down:
        node.kill()
    started = time.monotonic()
    status, _ = call(survivor, "PUT", "/v1/files/q/after", b"after", timeout=30)
    assert status == 503
    assert time.monotonic() - started < 11.0
    started = time.monotonic()
    assert get(survivor, "/q/before")[0] == 503  # cannot confirm it is current: never stale
    assert time.monotonic() - started < 11.0
    status, _ = call(survivor, "GET", "/health")
    assert status == 200
    for node in down:
        node.start()
    wait_leader(cluster)
    until(lambda: put(survivor, "/q/after", b"after") in (200, 201), 20, "writes to resume")
    assert get(survivor, "/q/before") == (200, b"before")


def test_history_of_16_clients_across_a_node_kill_is_reflected_exactly(
    cluster: list[ClusterNode],
) -> None:
    """16 clients create, overwrite and delete their own keys through every node while the
    leader is killed and restarted. Afterwards every node shows, for every key, the outcome of
    its last acknowledged operation, or of an operation whose answer was lost after it (never a
    value no client wrote, never an acknowledged change undone)."""
    import random
    import threading

    stop = threading.Event()
    lock = threading.Lock()
    #: key -> (last acknowledged value or None for absent, values an unanswered op may have left)
    truth: dict[str, tuple[bytes | None, set[bytes | None]]] = {}
    counts = {"ok": 0, "uncertain": 0, "refused": 0}
    unexpected: list[tuple[str, str, str, int, bytes]] = []

    def client(c: int) -> None:
        rng = random.Random(c)
        keys = [f"/hist/c{c}/k{j}" for j in range(4)]
        for key in keys:
            truth[key] = (None, set())
        n = 0
        while not stop.is_set():
            n += 1
            key = rng.choice(keys)
            node = cluster[rng.randrange(3)]
            body = b"c%d-%d" % (c, n)
            op = rng.choice(["create", "put", "put", "delete"])
            method, data, outcome = {
                "create": ("POST", body, body),
                "put": ("PUT", body, body),
                "delete": ("DELETE", None, None),
            }[op]
            try:
                status, _ = call(node, method, "/v1/files" + key, data, timeout=8)
            except OSError:
                status, _ = 0, b""
            _acked, maybe = truth[key]
            with lock:
                if 200 <= status < 300:
                    truth[key] = (outcome, set())
                    counts["ok"] += 1
                elif status in (0, 500, 502, 503):
                    maybe.add(outcome)
                    counts["uncertain"] += 1
                elif status in (404, 409):  # create of an existing key, delete of nothing
                    counts["refused"] += 1
                else:
                    unexpected.append((method, key, node.name, status, _))

    leader = wait_leader(cluster)
    threads = [threading.Thread(target=client, args=(c,)) for c in range(16)]
    for t in threads:
        t.start()
    try:
        time.sleep(2.0)
        leader.kill()
        time.sleep(3.0)
        leader.start()
        time.sleep(2.0)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    wait_leader(cluster)
    print(f"history: {counts}")
    assert not unexpected, unexpected[:5]
    assert counts["ok"] > 100
    for key, (acked, maybe) in sorted(truth.items()):
        allowed = {acked} | maybe
        seen = []
        for node in cluster:
            status, body = get_past(node, key)
            seen.append(None if status == 404 else body)
            assert status in (200, 404), (node.name, key, status)
        assert seen[0] == seen[1] == seen[2], (key, seen)
        assert seen[0] in allowed, (key, seen[0], acked, maybe)
    for node in cluster:  # a follower never drops entries it applied (pysyncobj logs CRITICAL)
        assert "truncating already-applied" not in node.log_path.read_text(errors="replace")


def get_past(node: ClusterNode, path: str, timeout: float = 20.0) -> tuple[int, bytes]:
    """GET, waiting out 503s while the node catches up after a restart."""
    deadline = time.monotonic() + timeout
    while True:
        status, body = get(node, path)
        if status != 503 or time.monotonic() > deadline:
            return status, body
        time.sleep(0.1)


async def test_websocket_upload_to_a_file_another_node_owns(cluster: list[ClusterNode]) -> None:
    """§10: replacing an existing file over WebSocket through a node that does not own it
    streams the frames to the owner; download through a third node sees the new bytes."""
    import aiohttp

    assert put(cluster[0], "/up/owned.bin", b"old content") == 201
    new = os.urandom(200_000)
    async with aiohttp.ClientSession() as s:
        url = cluster[1].base.replace("http", "ws") + "/v1/files/ws/up/owned.bin?mode=upload"
        async with s.ws_connect(url, headers=H) as ws:
            for i in range(0, len(new), 65536):
                await ws.send_bytes(new[i : i + 65536])
            await ws.send_str("EOF")
            msg = await ws.receive(timeout=15)
            assert msg.data == f"ok:{len(new)}", msg
        assert get(cluster[2], "/up/owned.bin") == (200, new)
        url = cluster[2].base.replace("http", "ws") + "/v1/files/ws/up/owned.bin"
        got = b""
        async with s.ws_connect(url, headers=H) as ws:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.BINARY:
                    got += msg.data
            closed = (ws.close_code, msg.extra if msg.type == aiohttp.WSMsgType.CLOSE else None)
    assert got == new, closed
    status, _ = call(cluster[2], "HEAD", "/v1/files/up/owned.bin")
    assert status == 200
