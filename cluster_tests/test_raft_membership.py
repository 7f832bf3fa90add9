"""Raft membership through the operator CLI, against real ``callfs server`` processes: a fourth
node joins a running three-node group (``callfs cluster join``, then start it: LIBRARIES.md §1.8),
serves what was written before and is seen by the others; ``callfs cluster status`` shows the
group; ``callfs cluster remove`` takes the stopped node out; the group keeps writing with one
follower down. Also the join errors an operator meets: a non-leader, a server without the route.
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster_tests.harness import INTERNAL, ClusterNode, free_ports, node_config, until
from cluster_tests.raftlib import H, raft_cluster, raft_section, raft_status, wait_leader

pytestmark = pytest.mark.slow
CLI_TIMEOUT = 60.0


def call(
    node: ClusterNode, method: str, path: str, body: bytes | None = None, timeout: float = 15.0
) -> tuple[int, bytes]:
    req = urllib.request.Request(node.base + path, data=body, method=method, headers=H)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        return 0, repr(exc).encode()


def get_past(node: ClusterNode, path: str, transient: int, timeout: float) -> tuple[int, bytes]:
    """GET ``path`` through ``node`` until the answer is not ``transient``."""

    def settled() -> tuple[int, bytes] | None:
        got = call(node, "GET", "/v1/files" + path)
        return None if got[0] == transient else got

    result: tuple[int, bytes] = until(settled, timeout, f"{node.name}: GET {path} != {transient}")
    return result


def callfs(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m callfs ARGS`` with no ``CALLFS_*`` variables from the test environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLFS_")}
    return subprocess.run(
        [sys.executable, "-m", "callfs", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )


def fourth_node(workdir: Path, nodes: list[ClusterNode]) -> tuple[ClusterNode, Path]:
    """node-4's config (not started): the three members plus itself as peers, no bootstrap."""
    api_port, raft_port = free_ports(2)
    endpoints = {n.name: n.base for n in nodes} | {"node-4": f"http://127.0.0.1:{api_port}"}
    addrs = {n.name: str(n.config["raft"]["bind_addr"]) for n in nodes}
    addrs["node-4"] = f"127.0.0.1:{raft_port}"
    cfg = node_config("node-4", api_port, workdir, endpoints, {"type": "raft"}, {"type": "local"})
    cfg["raft"] = raft_section("node-4", addrs, endpoints, workdir, bootstrap=False)
    node = ClusterNode("node-4", api_port, workdir, cfg)
    path = workdir / "node-4.yaml"  # the file ClusterNode.start writes too
    path.write_text(yaml.safe_dump(cfg))
    return node, path


def status_json(cwd: Path, via: ClusterNode) -> tuple[int, dict[str, Any], str]:
    out = callfs(cwd, "cluster", "status", "-c", str(cwd / f"{via.name}.yaml"), "--json")
    return out.returncode, json.loads(out.stdout), out.stderr


def status_ok(cwd: Path, via: ClusterNode) -> tuple[int, dict[str, Any], str] | None:
    got = status_json(cwd, via)
    return got if got[0] == 0 else None


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[ClusterNode]]:
    nodes = raft_cluster(tmp_path)
    try:
        for node in nodes:
            node.start()
        wait_leader(nodes)
        yield nodes
    finally:
        for node in nodes:
            node.stop()


@pytest.mark.timeout(300)
def test_join_status_remove_through_the_cli(tmp_path: Path, cluster: list[ClusterNode]) -> None:
    leader = wait_leader(cluster)
    followers = [n for n in cluster if n is not leader]
    before = {f"/before/{i}.txt": b"before-%d" % i for i in range(len(cluster))}
    for node, (path, body) in zip(cluster, before.items(), strict=True):
        assert call(node, "PUT", "/v1/files" + path, body)[0] == 201, node.name
    node4, cfg4 = fourth_node(tmp_path, cluster)

    # A follower refuses; nothing changes.
    out = callfs(tmp_path, "cluster", "join", "--leader", followers[0].base, "-c", str(cfg4))
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "Error: join failed: not leader" in out.stderr
    assert len(raft_status(leader)["members"]) == 3

    # Join first (through the leader), then start the node; a second join is a no-op success.
    expected = f"Join successful: node=node-4 leader={leader.name} status=joined"
    for _ in range(2):
        out = callfs(tmp_path, "cluster", "join", "--leader", leader.base + "/", "-c", str(cfg4))
        assert out.returncode == 0, (out.stdout, out.stderr)
        assert out.stdout.strip() == expected
    try:
        node4.start()
        nodes = [*cluster, node4]
        assert wait_leader(nodes) is leader
        assert len(raft_status(leader)["members"]) == 4

        # node-4 serves what was written before it existed ...
        for path, body in before.items():
            # (503 while it catches up is allowed: never stale data)
            assert get_past(node4, path, 503, 30) == (200, body), path
        # ... and what it writes is read by every other node at once.
        assert call(node4, "PUT", "/v1/files/after/n4.txt", b"from node-4")[0] == 201
        # (Polled: other nodes learn node-4's endpoint up to 2 s late; the strict check is
        # test_a_joined_nodes_writes_are_readable_at_once_everywhere.)
        for node in cluster:
            assert get_past(node, "/after/n4.txt", 502, 10) == (200, b"from node-4"), node.name

        # status through a follower: four nodes, one leader, all answering.
        code, report, err = until(
            lambda: status_ok(tmp_path, followers[0]),
            30,
            "cluster status to exit 0 with four nodes",
        )
        assert sorted(r["node_id"] for r in report["nodes"]) == [n.name for n in nodes], report
        assert [r["node_id"] for r in report["nodes"] if r["role"] == "leader"] == [leader.name]
        assert report["leader_id"] == leader.name
        assert all(isinstance(r["lag"], int) and r["lag"] >= 0 for r in report["nodes"]), report
        text = callfs(
            tmp_path, "cluster", "status", "--url", node4.base, "--internal-secret", INTERNAL
        )
        assert text.returncode == 0, (text.stdout, text.stderr)
        lines = text.stdout.splitlines()
        assert lines[0].split() == ["NODE", "ENDPOINT", "ROLE", "TERM", "COMMIT", "APPLIED", "LAG"]
        assert len(lines) == 5, text.stdout
        assert [ln.split()[0] for ln in lines[1:] if ln.split()[2] == "leader"] == [leader.name]
    finally:
        node4.stop()

    # Unknown nodes are refused.
    out = callfs(tmp_path, "cluster", "remove", "node-9", "-c", str(tmp_path / "node-1.yaml"))
    assert out.returncode == 1 and "remove failed: unknown raft node" in out.stderr

    # With node-4 stopped, status says so (exit 1); removing it (asked via a follower) works.
    code, report, err = status_json(tmp_path, followers[1])
    assert code == 1 and "node node-4 did not answer" in err, (report, err)
    assert [r["role"] for r in report["nodes"] if r["node_id"] == "node-4"] == ["down"]
    out = callfs(
        tmp_path,
        "cluster",
        "remove",
        "node-4",
        "--url",
        followers[1].base,
        "--internal-secret",
        INTERNAL,
    )
    assert out.returncode == 0, (out.stdout, out.stderr)
    assert out.stdout.strip() == "Removed node=node-4"
    code, report, err = until(
        lambda: status_ok(tmp_path, leader),
        30,
        "cluster status to exit 0 with three nodes",
    )
    assert sorted(r["node_id"] for r in report["nodes"]) == [n.name for n in cluster]
    assert sorted(raft_status(leader)["members"]) == sorted(
        str(n.config["raft"]["bind_addr"]) for n in cluster
    )

    # One follower down: the other two still form a quorum of the three voters.
    down, alive = followers[0], [leader, followers[1]]
    down.stop()
    for i, writer in enumerate(alive):
        assert call(writer, "PUT", f"/v1/files/one-down/{i}.txt", b"w%d" % i)[0] == 201
        for reader in alive:
            assert call(reader, "GET", f"/v1/files/one-down/{i}.txt") == (200, b"w%d" % i)
    code, report, err = status_json(tmp_path, leader)
    assert code == 1 and f"node {down.name} did not answer" in err, (report, err)

    # Removing it too: although it stays in the others' config (raft.peers), it is no longer a
    # member anywhere, and status is content with the two voters left.
    out = callfs(
        tmp_path, "cluster", "remove", down.name, "-c", str(tmp_path / f"{leader.name}.yaml")
    )
    assert out.returncode == 0, (out.stdout, out.stderr)
    code, report, err = status_json(tmp_path, followers[1])
    assert code == 0, (report, err)
    roles = {r["node_id"]: r["role"] for r in report["nodes"]}
    assert roles == {leader.name: "leader", followers[1].name: "follower"}
    assert call(followers[1], "PUT", "/v1/files/two-voters.txt", b"2")[0] == 201
    assert call(leader, "GET", "/v1/files/two-voters.txt") == (200, b"2")

    # The leader itself (it was refused: "stop it and remove it from another"): it hands the
    # leadership over, and the new leader takes it out. Asked through itself, here.
    out = callfs(
        tmp_path, "cluster", "remove", leader.name, "-c", str(tmp_path / f"{leader.name}.yaml")
    )
    assert out.returncode == 0, (out.stdout, out.stderr)
    assert out.stdout.strip() == f"Removed node={leader.name}"
    after = raft_status(followers[1])
    assert after["state"] == "leader", after
    assert after["members"] == [str(followers[1].config["raft"]["bind_addr"])]
    assert call(followers[1], "PUT", "/v1/files/one-voter.txt", b"1")[0] == 201


def test_a_joined_nodes_writes_are_readable_at_once_everywhere(
    tmp_path: Path, cluster: list[ClusterNode]
) -> None:
    leader = wait_leader(cluster)
    node4, cfg4 = fourth_node(tmp_path, cluster)
    out = callfs(tmp_path, "cluster", "join", "--leader", leader.base, "-c", str(cfg4))
    assert out.returncode == 0, (out.stdout, out.stderr)
    try:
        node4.start()
        assert get_past(node4, "/nothing-yet", 503, 30)[0] == 404
        assert call(node4, "PUT", "/v1/files/at-once.txt", b"now")[0] == 201
        seen = {n.name: call(n, "GET", "/v1/files/at-once.txt") for n in cluster}
        assert seen == dict.fromkeys(seen, (200, b"now")), seen
    finally:
        node4.stop()


class _Html404(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = b"<html><body><h1>404 Not Found</h1></body></html>\n"
        self.send_response(404)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_join_against_a_server_without_the_route_reports_status_and_body(tmp_path: Path) -> None:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Html404)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        out = callfs(
            tmp_path,
            "cluster",
            "join",
            "--leader",
            base,
            "--node-id",
            "n9",
            "--raft-addr",
            "127.0.0.1:1",
            "--api-endpoint",
            "http://127.0.0.1:2",
            "--internal-secret",
            "s",
        )
        assert out.returncode == 1
        assert "Error: failed to decode join response: HTTP 404" in out.stderr, out.stderr
        assert "<h1>404 Not Found</h1>" in out.stderr
        assert "Extra data" not in out.stderr and "Expecting value" not in out.stderr
        for args in (["status"], ["remove", "n9"]):
            out = callfs(tmp_path, "cluster", *args, "--url", base, "--internal-secret", "s")
            assert out.returncode == 1
            assert "Error: failed to decode status response: HTTP 404" in out.stderr, out.stderr
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.mark.timeout(300)
def test_joins_that_would_break_the_group_are_refused_and_status_names_a_removed_node(
    tmp_path: Path, cluster: list[ClusterNode]
) -> None:
    """Found by review, each on real processes: a join under the leader's node ID (or its Raft
    address) answered success and left every follower unable to find the leader (503); a join
    of a node not started yet while one of three voters was down added the voter anyway, and
    the group, two of four, stopped taking writes and could not be repaired; and ``cluster
    status`` asked through a removed node that was started again listed it as a member and
    exited 0."""
    leader = wait_leader(cluster)
    followers = [n for n in cluster if n is not leader]
    _node4, cfg4 = fourth_node(tmp_path, cluster)
    three = sorted(raft_status(leader)["members"])
    assert len(three) == 3
    leader_addr = str(leader.config["raft"]["bind_addr"])
    for flags in (["--node-id", leader.name], ["--node-id", "node-9", "--raft-addr", leader_addr]):
        out = callfs(tmp_path, "cluster", "join", "--leader", leader.base, "-c", str(cfg4), *flags)
        assert out.returncode == 1, (flags, out.stdout, out.stderr)
        assert "a joining node needs a node ID and a Raft address of its own" in out.stderr
        assert sorted(raft_status(leader)["members"]) == three
        assert raft_status(leader)["nodes"][leader.name]["raft_addr"] == leader_addr
    for i, node in enumerate(followers):  # followers still find the leader
        assert call(node, "PUT", f"/v1/files/refused/{i}.txt", b"x")[0] == 201, node.name

    down, alive = followers[0], followers[1]
    down.stop()
    out = callfs(tmp_path, "cluster", "join", "--leader", leader.base, "-c", str(cfg4))
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "would leave the group without a majority" in out.stderr, out.stderr
    assert "the new node is not started" in out.stderr
    assert sorted(raft_status(leader)["members"]) == three
    assert call(alive, "PUT", "/v1/files/still-writing.txt", b"ok")[0] == 201

    # The down node is removed, then started again with its old data: status through it says
    # it runs outside the group (exit 1), and through a member all is well.
    out = callfs(tmp_path, "cluster", "remove", down.name, "-c", str(tmp_path / "node-1.yaml"))
    assert out.returncode == 0, (out.stdout, out.stderr)
    down.start()
    code, report, err = status_json(tmp_path, down)
    assert code == 1, (report, err)
    assert f"node {down.name} runs but is not a member" in err, err
    assert {r["node_id"]: r["role"] for r in report["nodes"]}[down.name] == "not-member"
    code, report, err = until(lambda: status_ok(tmp_path, alive), 30, "status through a member")
    assert down.name not in {r["node_id"] for r in report["nodes"]}
