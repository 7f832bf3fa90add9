"""The client side (docs/client.md) against a real ``callfs server`` subprocess: the SDK (sync and
async), the ``callfs put/get/ls/stat/rm/mv/mkdir/share/sync`` commands through click's runner, tus
resume after an interruption, and the fsspec filesystem (with pandas)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3
from click.testing import CliRunner
from fsspec.tests import abstract

from callfs.cli import cli
from callfs.client import AsyncClient, Client, ClientError, ResumeStore, TransportError
from callfs.client import sync as sync_mod
from callfs.client.commands import state_dir
from callfs.tests.functional.conftest import ALICE_KEY, BOB_KEY, node_env
from callfs.tests.test_e2e_dev import free_port

KiB = 1024
MiB = 1024 * KiB


def start_node(tmp: Path, port: int) -> subprocess.Popen[bytes]:
    """A ``callfs server`` (SQLite, localfs, local locks) on ``port`` with its data under
    ``tmp``, answering ``/health``."""
    base = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        **node_env(
            tmp,
            CALLFS_SERVER__LISTEN_ADDR=f"127.0.0.1:{port}",
            CALLFS_SERVER__EXTERNAL_URL=base,
        ),
    }
    with (tmp / "server.log").open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "callfs", "server"], cwd=tmp, env=env, stdout=log, stderr=log
        )
    http = urllib3.PoolManager(retries=False)
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {(tmp / 'server.log').read_text()}")
        try:
            if http.request("GET", base + "/health", timeout=1.0).status == 200:
                return proc
        except urllib3.exceptions.HTTPError:
            pass
        if time.monotonic() > deadline:
            stop_node(proc)
            raise AssertionError("server did not answer /health in 30 s")
        time.sleep(0.1)


def stop_node(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One node as a subprocess, shared by this module; each test works under its own
    directory."""
    port = free_port()
    proc = start_node(tmp_path_factory.mktemp("callfs-node"), port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_node(proc)


@pytest.fixture
def client(server: str) -> Iterator[Client]:
    with Client(server, ALICE_KEY) as c:
        yield c


@pytest.fixture
def root(client: Client) -> str:
    """A fresh remote directory for one test."""
    path = f"/t-{uuid.uuid4().hex[:10]}"
    client.mkdir(path)
    return path


@pytest.fixture
def cli_env(server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Connection settings in the environment; profile and state files under ``tmp_path``."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("CALLFS_PROFILE", raising=False)
    monkeypatch.setenv("CALLFS_URL", server)
    monkeypatch.setenv("CALLFS_API_KEY", ALICE_KEY)
    return {"CALLFS_URL": server, "CALLFS_API_KEY": ALICE_KEY}


def run(*args: str, code: int = 0, stdin: bytes | None = None) -> Any:
    result = CliRunner().invoke(cli, list(args), input=stdin)
    assert result.exit_code == code, (args, result.exit_code, result.output, result.exception)
    return result


def run_json(*args: str, code: int = 0) -> Any:
    return json.loads(run(*args, "--json", code=code).stdout)


# ---- SDK -------------------------------------------------------------------------------------
def test_streaming_round_trip_and_ranges(client: Client, root: str, tmp_path: Path) -> None:
    data = os.urandom(3 * MiB + 17)
    chunks = (data[i : i + 100_000] for i in range(0, len(data), 100_000))
    result = client.upload(f"{root}/gen.bin", chunks)  # size unknown: chunked PUT
    assert not result.resumable
    local = tmp_path / "src.bin"
    local.write_bytes(data)
    seen: list[int] = []
    assert client.upload(f"{root}/file.bin", local, progress=seen.append).size == len(data)
    assert sum(seen) == len(data)
    with local.open("rb") as f:
        client.upload(f"{root}/fobj.bin", f)
    for name in ("gen.bin", "file.bin", "fobj.bin"):
        with client.open(f"{root}/{name}") as d:
            assert d.entry.size == len(data)
            assert b"".join(d.iter_chunks(64 * KiB)) == data
    out = tmp_path / "out.bin"
    got: list[int] = []
    entry = client.download(f"{root}/file.bin", out, progress=got.append)
    assert out.read_bytes() == data and sum(got) == len(data) and entry.size == len(data)
    assert client.read(f"{root}/file.bin", 10, 20) == data[10:20]
    assert client.read(f"{root}/file.bin", -5) == data[-5:]
    assert client.read(f"{root}/file.bin", len(data) - 3, len(data) + 100) == data[-3:]
    assert client.read(f"{root}/file.bin", len(data) + 1) == b""  # 416 → empty
    with client.open(f"{root}/file.bin", 1000, 1000 + 4096) as d:
        assert d.status == 206 and d.read() == data[1000:5096]
    st = client.stat(f"{root}/file.bin")
    assert (st.type, st.size, st.owner, st.name) == ("file", len(data), "alice", "file.bin")
    assert st.mtime_epoch is not None and abs(st.mtime_epoch - time.time()) < 120


def test_listing_pages_through_next(client: Client, root: str) -> None:
    names = [f"f{i:02d}" for i in range(7)]
    for n in names:
        client.upload(f"{root}/{n}", n.encode())
    client.mkdir(f"{root}/sub/deeper")
    paged = [e.name for e in client.list(root, page_size=2)]
    assert paged == [*names, "sub"]  # files first, then directories
    assert paged == [e.name for e in client.list(root)]
    deep = [e.path for e in client.list(root, recursive=True)]
    assert f"{root}/sub/deeper" in deep and len(deep) == 9
    requests = 0
    real = client._json

    def counting(*a: Any, **kw: Any) -> Any:
        nonlocal requests
        requests += 1
        return real(*a, **kw)

    client._json = counting  # type: ignore[method-assign]
    assert len(list(client.list(root, page_size=3))) == 8
    assert requests == 3


def test_namespace_operations_and_links(client: Client, root: str) -> None:
    assert client.mkdir(f"{root}/a/b") is True
    assert client.mkdir(f"{root}/a/b") is False
    client.upload(f"{root}/a/x.txt", b"hello")
    assert client.move(f"{root}/a/x.txt", f"{root}/c/y.txt", create_parents=True) == (
        f"{root}/c/y.txt"
    )
    assert client.rename(f"{root}/c/y.txt", "z.txt") == f"{root}/c/z.txt"
    link = client.share(f"{root}/c/z.txt", 60)
    assert link.token and link.url.endswith(link.token)
    anonymous = urllib3.PoolManager().request("GET", link.url)
    assert (anonymous.status, anonymous.data) == (200, b"hello")
    client.delete(f"{root}/a", recursive=True)
    assert not client.exists(f"{root}/a")
    assert client.exists(f"{root}/c/z.txt")


def test_errors_carry_code_message_status(server: str, client: Client, root: str) -> None:
    with pytest.raises(ClientError) as info:
        client.read(f"{root}/missing")
    assert (info.value.status, info.value.code, info.value.message) == (
        404,
        "FILE_NOT_FOUND",
        "file not found",
    )
    assert info.value.request_id and len(info.value.request_id) == 16
    with pytest.raises(ClientError) as info:
        client.stat(f"{root}/missing")  # HEAD: no body, the code comes from the status
    assert (info.value.status, info.value.code) == (404, "FILE_NOT_FOUND")
    client.upload(f"{root}/d/f", b"x")
    with pytest.raises(ClientError) as info:
        client.delete(f"{root}/d")
    assert (info.value.status, info.value.code) == (409, "DIRECTORY_NOT_EMPTY")
    with Client(server, BOB_KEY) as bob, pytest.raises(ClientError) as info:
        bob.delete(f"{root}/d/f")
    assert (info.value.status, info.value.code) == (403, "PERMISSION_DENIED")
    with Client(server, "wrong-key") as nobody, pytest.raises(ClientError) as info:
        nobody.list("/").__next__()
    assert (info.value.status, info.value.code) == (401, "AUTHENTICATION_FAILED")
    dead = Client(f"http://127.0.0.1:{free_port()}", ALICE_KEY, timeout=2)
    with dead, pytest.raises(TransportError) as net:
        dead.stat("/")
    assert (net.value.status, net.value.code) == (0, "NETWORK_ERROR")


def test_resumable_upload_resumes_after_interruption(
    client: Client, root: str, tmp_path: Path
) -> None:
    if not client.supports_tus():
        pytest.skip("the server has no tus endpoint at /v1/uploads")
    data = os.urandom(3 * MiB + 5)
    local = tmp_path / "big.bin"
    local.write_bytes(data)
    store = ResumeStore(tmp_path / "uploads.json")
    sent = 0

    def stop_midway(n: int) -> None:
        nonlocal sent
        sent += n
        if sent > 2 * MiB:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        client.upload_file(
            local,
            f"{root}/big.bin",
            resumable=True,
            chunk_size=512 * KiB,
            progress=stop_midway,
            resume_store=store,
        )
    key = ResumeStore.key(client.url, f"{root}/big.bin", local)
    url = store.get(key)
    assert url is not None and "/v1/uploads/" in url
    acknowledged = client.tus_offset(url)
    # The interrupted PATCH may still be landing on the server (its body had been sent): read
    # the offset until it holds still, so the resume below starts where the server really is.
    for _ in range(20):
        time.sleep(0.1)
        settled, acknowledged = acknowledged, client.tus_offset(url)
        if settled == acknowledged:
            break
    assert 0 < acknowledged < len(data) and acknowledged % (512 * KiB) == 0
    assert not client.exists(f"{root}/big.bin")
    result = client.upload_file(
        local, f"{root}/big.bin", resumable=True, chunk_size=512 * KiB, resume_store=store
    )
    assert result.resumable and result.resumed_from == acknowledged
    assert client.read(f"{root}/big.bin") == data
    assert store.get(key) is None
    # an unknown or finished upload URL starts a new upload instead of failing
    again = client.upload(f"{root}/big.bin", data[:1000], resumable=True, upload_url=url)
    assert again.resumed_from == 0 and client.read(f"{root}/big.bin") == data[:1000]


def test_large_puts_use_tus_by_default(client: Client, root: str) -> None:
    if not client.supports_tus():
        pytest.skip("the server has no tus endpoint at /v1/uploads")
    data = os.urandom(sync_mod.RESUMABLE_THRESHOLD + 1)
    assert client.upload(f"{root}/auto.bin", data).resumable
    assert not client.upload(f"{root}/small.bin", data[:100]).resumable
    assert client.read(f"{root}/auto.bin", -10) == data[-10:]


async def test_async_client(server: str, tmp_path: Path) -> None:
    root = f"/a-{uuid.uuid4().hex[:10]}"
    data = os.urandom(2 * MiB + 3)

    async def gen() -> Any:
        for i in range(0, len(data), 300_000):
            yield data[i : i + 300_000]

    async with AsyncClient(server, ALICE_KEY) as c:
        assert await c.mkdir(root)
        await c.upload(f"{root}/gen.bin", gen())
        local = tmp_path / "x.bin"
        local.write_bytes(data)
        await c.upload(f"{root}/file.bin", local)
        if await c.supports_tus():
            r = await c.upload(f"{root}/tus.bin", data, resumable=True, chunk_size=700_000)
            assert r.resumable
            assert await c.read(f"{root}/tus.bin") == data
        assert await c.read(f"{root}/gen.bin") == data
        assert await c.read(f"{root}/file.bin", 5, 9) == data[5:9]
        await c.download(f"{root}/file.bin", tmp_path / "y.bin")
        assert (tmp_path / "y.bin").read_bytes() == data
        for i in range(5):
            await c.upload(f"{root}/p/{i}", b"x")
        assert [e.name async for e in c.list(f"{root}/p", page_size=2)] == list("01234")
        assert (await c.stat(f"{root}/p/0")).size == 1
        assert await c.move(f"{root}/p/0", f"{root}/q/0", create_parents=True) == f"{root}/q/0"
        assert (await c.share(f"{root}/q/0")).token
        with pytest.raises(ClientError) as info:
            await c.delete(f"{root}/p")
        assert info.value.code == "DIRECTORY_NOT_EMPTY"
        await c.delete(root, recursive=True)
        assert not await c.exists(root)


# ---- commands ----------------------------------------------------------------------------------
def test_cli_commands(cli_env: dict[str, str], client: Client, root: str, tmp_path: Path) -> None:
    src = tmp_path / "hello.txt"
    src.write_bytes(b"hello world\n")
    put = run_json("put", str(src), f"{root}/")
    assert put == {"path": f"{root}/hello.txt", "size": 12, "resumable": False, "resumed_from": 0}
    assert "uploaded" in run("put", str(src), f"callfs:{root}/second.txt").stdout
    st = run_json("stat", f"{root}/hello.txt")
    assert (st["type"], st["size"], st["owner"]) == ("file", 12, "alice")
    assert run("ls", root).stdout.splitlines() == ["hello.txt", "second.txt"]
    assert [e["name"] for e in run_json("ls", root)] == ["hello.txt", "second.txt"]
    out = tmp_path / "copy.txt"
    got = run_json("get", f"{root}/hello.txt", str(out))
    assert got["size"] == 12 and out.read_bytes() == b"hello world\n"
    remote_mtime = client.stat(f"{root}/hello.txt").mtime_epoch
    assert remote_mtime is not None and out.stat().st_mtime == remote_mtime  # get keeps it
    assert run("get", f"{root}/hello.txt", "-").stdout_bytes == b"hello world\n"
    run("put", "-", f"{root}/stdin.txt", stdin=b"from stdin")
    assert client.read(f"{root}/stdin.txt") == b"from stdin"
    assert run_json("mkdir", f"{root}/m/n", f"{root}/m/n") == [
        {"path": f"{root}/m/n", "created": True},
        {"path": f"{root}/m/n", "created": False},
    ]
    assert run_json("mv", f"{root}/hello.txt", f"{root}/x/y.txt", "-p")["path"] == f"{root}/x/y.txt"
    link = run_json("share", f"{root}/x/y.txt", "--expiry", "60")
    assert urllib3.PoolManager().request("GET", link["url"]).data == b"hello world\n"
    assert run("share", f"{root}/second.txt").stdout.strip().startswith("http://")
    long = run("ls", "-l", "-r", root).stdout
    assert f"{root}/x/y.txt" in long and f"{root}/m/n" in long
    # errors: the server's code and message, exit 1; --json adds the error object on stdout
    missing = run("rm", f"{root}/nope", code=1)
    assert "FILE_NOT_FOUND: file not found (HTTP 404)" in missing.stderr
    err = run_json("stat", f"{root}/nope", code=1)["error"]
    assert (err["status"], err["code"]) == (404, "FILE_NOT_FOUND")
    assert "DIRECTORY_NOT_EMPTY" in run("rm", f"{root}/x", code=1).stderr
    assert run_json("rm", "-r", f"{root}/x") == {"deleted": [f"{root}/x"]}
    assert not client.exists(f"{root}/x")
    assert "AUTHENTICATION_FAILED" in run("stat", root, "--api-key", "wrong", code=1).stderr
    assert run("ls", f"{root}/second.txt").stdout == "second.txt\n"  # a file lists as itself


def test_cli_settings_from_profile(
    cli_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, root: str
) -> None:
    monkeypatch.delenv("CALLFS_URL")
    monkeypatch.delenv("CALLFS_API_KEY")
    assert "no server URL" in run("ls", root, code=1).stderr
    conf = tmp_path / "config" / "callfs" / "client.yaml"
    conf.parent.mkdir(parents=True)
    conf.write_text(
        "default_profile: work\n"
        "profiles:\n"
        f"  work:\n    url: {cli_env['CALLFS_URL']}\n    api_key: {ALICE_KEY}\n"
        f"  bob:\n    url: {cli_env['CALLFS_URL']}\n    api_key: {BOB_KEY}\n"
        f"  bad:\n    url: {cli_env['CALLFS_URL']}\n    api_key: nope\n"
    )
    run("ls", root)
    assert run_json("stat", root, "--profile", "bob")["owner"] == "alice"
    assert "AUTHENTICATION_FAILED" in run("ls", root, "--profile", "bad", code=1).stderr
    run("ls", root, "--profile", "bad", "--api-key", ALICE_KEY)  # a flag beats the profile
    assert "no profile 'gone'" in run("ls", "--profile", "gone", code=1).stderr
    # others may read it: said (it holds keys); 0600 is quiet
    conf.chmod(0o644)
    assert f"warning: {conf} holds API keys" in run("ls", root).stderr
    conf.chmod(0o600)
    assert "warning" not in run("ls", root).stderr
    # a damaged file: where, never the line (found by audit: it printed the key)
    secret = "SECRETKEY123456789abcdef"
    for damaged in (f'profiles:\n  w:\n    api_key: "{secret}\n', f"x: {secret}: y\n"):
        conf.write_text(damaged)
        err = run("ls", root, code=1).stderr
        assert "not valid YAML (line" in err and "SECRETKEY" not in err and "KEY12" not in err


def test_cli_local_errors_are_one_line_and_a_quoted_insecure_is_refused(
    cli_env: dict[str, str], client: Client, root: str, tmp_path: Path
) -> None:
    """From a client audit: a missing local directory, a directory in a file's place, and a file
    in a synced directory's place were tracebacks; a profile's quoted ``insecure: "false"`` was
    truthy (TLS checks off)."""
    client.upload(f"{root}/g/x.txt", b"x")
    client.mkdir(f"{root}/g/sub")
    got = run("get", f"{root}/g/x.txt", str(tmp_path / "nonexist" / "x.txt"), code=1)
    assert got.stderr.startswith("Error: ") and "Traceback" not in got.output
    # the path given, not the hidden part file beside it (found by audit)
    assert f"{tmp_path / 'nonexist' / 'x.txt'}: " in got.stderr and "callfs-part" not in got.stderr
    (tmp_path / "out" / "x.txt").mkdir(parents=True)
    got = run("get", f"{root}/g/x.txt", str(tmp_path / "out"), code=1)
    assert got.stderr.startswith("Error: ") and got.exception is not None
    assert isinstance(got.exception, SystemExit)
    (tmp_path / "afile").write_text("x")
    assert run("sync", f"callfs:{root}/g", str(tmp_path / "afile"), code=1).stderr.startswith(
        "Error: "
    )
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "sub").write_text("a file where the directory goes")
    summary = run_json("sync", f"callfs:{root}/g", str(tmp_path / "copy"), code=1)
    assert [f["path"] for f in summary["failed"]] == ["sub"]
    assert summary["files"] == ["x.txt"]  # the others go on
    assert (tmp_path / "copy" / "x.txt").read_bytes() == b"x"
    conf = tmp_path / "config" / "callfs" / "client.yaml"
    conf.parent.mkdir(parents=True)
    conf.write_text(f'profiles:\n  q:\n    url: {cli_env["CALLFS_URL"]}\n    insecure: "false"\n')
    assert "insecure must be true or false" in run("ls", root, "--profile", "q", code=1).stderr


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_resumable_upload_waits_out_a_server_restart(tmp_path: Path, flavour: str) -> None:
    """docs/client.md: a broken connection is retried in place. The HEAD that asks the offset
    after a failed PATCH was outside the retries: with the server down for more than a second
    the upload gave up at once (found by audit)."""
    port = free_port()
    node_dir = tmp_path / "node"
    node_dir.mkdir()
    proc = start_node(node_dir, port)
    data = os.urandom(3 * MiB + 7)
    restarted: list[subprocess.Popen[bytes]] = []
    seen = 0

    def restart() -> None:
        time.sleep(2.0)  # down longer than the first retries' waits
        restarted.append(start_node(node_dir, port))

    def kill_midway(n: int) -> None:
        nonlocal seen
        seen += n
        if seen > MiB and proc.poll() is None:
            proc.kill()
            proc.wait()
            threading.Thread(target=restart, daemon=True).start()

    base = f"http://127.0.0.1:{port}"
    try:
        if flavour == "sync":
            with Client(base, ALICE_KEY) as c:
                c.upload("/restart.bin", data, resumable=True, chunk_size=256 * KiB,
                         progress=kill_midway)  # fmt: skip
                assert c.read("/restart.bin") == data
        else:
            import asyncio

            async def go() -> bytes:
                async with AsyncClient(base, ALICE_KEY) as c:
                    await c.upload("/restart.bin", data, resumable=True, chunk_size=256 * KiB,
                                   progress=kill_midway)  # fmt: skip
                    return await c.read("/restart.bin")

            assert asyncio.run(go()) == data
        assert restarted and seen >= len(data)
    finally:
        for running in [proc, *restarted]:
            if running.poll() is None:
                stop_node(running)


def test_async_download_cut_off_is_a_transport_error(tmp_path: Path) -> None:
    """docs/client.md: every method raises ``ClientError`` (``TransportError`` when no answer
    came). A download whose server died mid-body raised aiohttp's own ClientPayloadError from
    ``AsyncClient`` (the blocking client wrapped it; found by audit)."""
    import asyncio

    port = free_port()
    proc = start_node(tmp_path, port)
    base = f"http://127.0.0.1:{port}"
    with Client(base, ALICE_KEY) as c:
        c.upload("/big.bin", os.urandom(64 * MiB))

    def kill(_n: int) -> None:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    async def go() -> None:
        async with AsyncClient(base, ALICE_KEY) as c:
            await c.download("/big.bin", tmp_path / "out.bin", progress=kill)

    try:
        with pytest.raises(TransportError):
            asyncio.run(go())
        assert not (tmp_path / "out.bin").exists()
        assert not (tmp_path / ".out.bin.callfs-part").exists()
    finally:
        if proc.poll() is None:
            stop_node(proc)


def test_cli_put_resumes_after_ctrl_c(
    cli_env: dict[str, str],
    client: Client,
    root: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if not client.supports_tus():
        pytest.skip("the server has no tus endpoint at /v1/uploads")
    data = os.urandom(3 * MiB)
    local = tmp_path / "big.bin"
    local.write_bytes(data)
    real = sync_mod.Client._tus_patch
    calls = 0

    def interrupted(self: Client, *a: Any, **kw: Any) -> int:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyboardInterrupt
        return real(self, *a, **kw)

    monkeypatch.setattr(sync_mod.Client, "_tus_patch", interrupted)
    first = run("put", str(local), f"{root}/big.bin", "--resumable", "--chunk-size", "1", code=130)
    assert "run the same command again to resume" in first.stderr
    assert (state_dir() / "uploads.json").exists()
    monkeypatch.setattr(sync_mod.Client, "_tus_patch", real)
    second = run_json("put", str(local), f"{root}/big.bin", "--resumable", "--chunk-size", "1")
    assert second == {
        "path": f"{root}/big.bin",
        "size": len(data),
        "resumable": True,
        "resumed_from": 2 * MiB,
    }
    assert client.read(f"{root}/big.bin") == data
    assert json.loads((state_dir() / "uploads.json").read_text()) == {}


def test_cli_sync_both_ways(
    cli_env: dict[str, str], client: Client, root: str, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    files = {f"d{i % 4}/sub{i % 3}/f{i}.txt": os.urandom(i * 37) for i in range(40)}
    files["top.bin"] = os.urandom(200 * KiB)
    for rel, body in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(body)
    (src / "empty-dir").mkdir()
    up = run_json("sync", str(src), f"callfs:{root}/tree", "-j", "6")
    assert (up["direction"], up["transferred"], up["skipped"], up["failed"]) == (
        "up",
        len(files),
        0,
        [],
    )
    assert up["bytes"] == sum(len(b) for b in files.values())
    assert client.stat(f"{root}/tree/empty-dir").is_dir
    again = run_json("sync", str(src), f"callfs:{root}/tree")
    assert (again["transferred"], again["skipped"]) == (0, len(files))
    (src / "top.bin").write_bytes(b"changed")
    changed = run_json("sync", str(src), f"callfs:{root}/tree")
    assert changed["files"] == ["top.bin"]
    files["top.bin"] = b"changed"
    dry = run_json("sync", f"callfs:{root}/tree", str(tmp_path / "dst"), "--dry-run")
    assert dry["transferred"] == len(files) and not (tmp_path / "dst").exists()
    down = run_json("sync", f"callfs:{root}/tree", str(tmp_path / "dst"))
    assert (down["direction"], down["transferred"], down["failed"]) == ("down", len(files), [])
    for rel, body in files.items():
        assert (tmp_path / "dst" / rel).read_bytes() == body, rel
    assert (tmp_path / "dst" / "empty-dir").is_dir()
    assert run_json("sync", f"callfs:{root}/tree", str(tmp_path / "dst"))["skipped"] == len(files)
    text = run("sync", str(src), f"callfs:{root}/tree").stdout
    assert text.strip() == f"transferred 0 files (0 B), skipped {len(files)}, failed 0"
    assert "exactly one of SRC and DST" in run("sync", str(src), str(tmp_path), code=2).stderr
    assert (
        "FILE_NOT_FOUND" in run("sync", f"callfs:{root}/none", str(tmp_path / "n"), code=1).stderr
    )


def test_cli_sync_up_sends_an_edit_made_in_the_second_of_the_last_upload(
    cli_env: dict[str, str], client: Client, root: str, tmp_path: Path
) -> None:
    """Found by audit: the remote copy is stamped when written; a same-size edit within that
    second looked "not newer" and was skipped by every later sync."""
    src = tmp_path / "same"
    src.mkdir()
    (src / "f.txt").write_bytes(b"AAAA")
    run_json("sync", str(src), f"callfs:{root}/same")
    stamp = client.stat(f"{root}/same/f.txt").mtime_epoch
    assert stamp is not None
    (src / "f.txt").write_bytes(b"BBBB")
    inside = int(stamp) * 1_000_000_000 + 500_000_000  # within the upload's second
    os.utime(src / "f.txt", ns=(inside, inside))
    assert run_json("sync", str(src), f"callfs:{root}/same")["files"] == ["f.txt"]
    assert client.read(f"{root}/same/f.txt") == b"BBBB"
    assert run_json("sync", str(src), f"callfs:{root}/same")["skipped"] == 1  # no extra upload
    # changed elsewhere, synced down into the same directory: not sent back up afterwards
    client.upload(f"{root}/same/f.txt", b"CCCC")
    os.utime(src / "f.txt", (stamp - 10, stamp - 10))  # older than the remote: fetched
    assert run_json("sync", f"callfs:{root}/same", str(src))["files"] == ["f.txt"]
    assert (src / "f.txt").read_bytes() == b"CCCC"
    assert run_json("sync", str(src), f"callfs:{root}/same")["transferred"] == 0


# ---- the large cases (slow: a GiB through the commands, 1,000-file trees) ---------------
BIG_GENERATED = 1024 * MiB


def _write_generated(path: Path, size: int) -> str:
    """``size`` bytes of a deterministic stream (one random MiB, each copy stamped with its
    index, so a lost, repeated or reordered MiB changes the digest); its SHA-256."""
    block = bytearray(os.urandom(MiB))
    digest = hashlib.sha256()
    with path.open("wb") as f:
        for i in range(0, size, MiB):
            block[:8] = i.to_bytes(8, "big")
            piece = block[: min(MiB, size - i)]
            f.write(piece)
            digest.update(piece)
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(4 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.mark.slow
def test_cli_put_get_1gib_checksum(
    cli_env: dict[str, str], client: Client, root: str, tmp_path: Path
) -> None:
    """``callfs put`` of 1 GiB (tus, default 64 MiB chunks) and ``callfs get`` back: the
    downloaded file's SHA-256 is the source's."""
    src = tmp_path / "big.bin"
    want = _write_generated(src, BIG_GENERATED)
    try:
        put = run_json("put", str(src), f"{root}/big.bin")
        assert put == {
            "path": f"{root}/big.bin",
            "size": BIG_GENERATED,
            "resumable": client.supports_tus(),
            "resumed_from": 0,
        }
        assert client.stat(f"{root}/big.bin").size == BIG_GENERATED
        src.unlink()  # half the disk use before the download
        out = tmp_path / "back.bin"
        got = run_json("get", f"{root}/big.bin", str(out))
        assert got == {"path": f"{root}/big.bin", "local": str(out), "size": BIG_GENERATED}
        assert out.stat().st_size == BIG_GENERATED
        assert _sha256(out) == want
        assert not list(tmp_path.glob(".*.callfs-part"))
    finally:
        client.delete(root, recursive=True)
        for f in tmp_path.glob("*.bin"):
            f.unlink()


@pytest.mark.slow
def test_cli_sync_1000_files_both_ways(
    cli_env: dict[str, str], client: Client, root: str, tmp_path: Path
) -> None:
    """``callfs sync`` of a tree of 1,000 files up and back down, byte-exact, and a second run
    each way transfers nothing."""
    rng = random.Random(16)
    src = tmp_path / "src"
    files: dict[str, bytes] = {}
    for i in range(1000):
        rel = f"a{i % 7}/b{i % 5}/f{i:04d}.bin" if i % 3 else f"top{i:04d}.bin"
        files[rel] = rng.randbytes(rng.choice((0, 1, 100, 4096, 8191)))
    for rel, body in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(body)
    up = run_json("sync", str(src), f"callfs:{root}/tree")
    assert (up["transferred"], up["skipped"], up["failed"]) == (1000, 0, [])
    assert up["bytes"] == sum(map(len, files.values()))
    remote = {
        e.path.removeprefix(f"{root}/tree/"): e.size
        for e in client.list(f"{root}/tree", recursive=True)
        if not e.is_dir
    }
    assert remote == {rel: len(body) for rel, body in files.items()}
    down = run_json("sync", f"callfs:{root}/tree", str(tmp_path / "dst"), "-j", "16")
    assert (down["transferred"], down["skipped"], down["failed"]) == (1000, 0, [])
    local = {
        p.relative_to(tmp_path / "dst").as_posix(): p.read_bytes()
        for p in (tmp_path / "dst").rglob("*")
        if p.is_file()
    }
    assert local == files
    again_up = run_json("sync", str(src), f"callfs:{root}/tree")
    assert (again_up["transferred"], again_up["skipped"]) == (0, 1000)
    again_down = run_json("sync", f"callfs:{root}/tree", str(tmp_path / "dst"))
    assert (again_down["transferred"], again_down["skipped"]) == (0, 1000)
    client.delete(root, recursive=True)


@pytest.mark.slow
def test_cli_put_subprocess_ctrl_c_then_resume(
    cli_env: dict[str, str], client: Client, root: str, tmp_path: Path
) -> None:
    """A real ``callfs put`` process gets SIGINT (Ctrl-C) mid-upload: it exits 130 keeping the
    upload URL; the same command run again continues from the server's offset."""
    if not client.supports_tus():
        pytest.skip("the server has no tus endpoint at /v1/uploads")
    size = 32 * MiB
    src = tmp_path / "big.bin"
    want = _write_generated(src, size)
    # The real command, with Python's SIGINT handler even when this test runs with SIGINT ignored
    # (a background job), and 50 ms after each 1 MiB PATCH so that a fast machine cannot finish
    # before the signal comes.
    starter = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "from callfs.client import sync\n"
        "real = sync.Client._tus_patch\n"
        "def slow(self, *a, **kw):\n"
        "    offset = real(self, *a, **kw)\n"
        "    time.sleep(0.05)\n"
        "    return offset\n"
        "sync.Client._tus_patch = slow\n"
        "from callfs.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    argv = ["put", str(src), f"{root}/big.bin", "--chunk-size", "1", "--json"]
    env = {**os.environ, **cli_env}
    store = state_dir() / "uploads.json"
    proc = subprocess.Popen(
        [sys.executable, "-c", starter, *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        acknowledged = 0
        while acknowledged < 2 * MiB:  # wait for two PATCHes: the server holds bytes
            assert proc.poll() is None, f"put ended before the interrupt: {proc.communicate()}"
            assert time.monotonic() < deadline, "no acknowledged bytes in 60 s"
            time.sleep(0.01)
            entries = json.loads(store.read_text()) if store.exists() else {}
            if entries:
                (entry,) = entries.values()
                acknowledged = client.tus_offset(entry["upload_url"])
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, (out, err)
    assert b"run the same command again to resume" in err
    assert not client.exists(f"{root}/big.bin")
    (entry,) = json.loads(store.read_text()).values()
    stopped_at = client.tus_offset(entry["upload_url"])
    assert 2 * MiB <= stopped_at < size  # a broken PATCH may keep part of its body
    second = subprocess.run(
        [sys.executable, "-m", "callfs", *argv],
        env=env,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout) == {
        "path": f"{root}/big.bin",
        "size": size,
        "resumable": True,
        "resumed_from": json.loads(second.stdout)["resumed_from"],
    }
    assert stopped_at <= json.loads(second.stdout)["resumed_from"] < size  # offsets only grow
    assert json.loads(store.read_text()) == {}
    back = tmp_path / "back.bin"
    client.download(f"{root}/big.bin", back)
    assert _sha256(back) == want
    client.delete(root, recursive=True)


# ---- fsspec ------------------------------------------------------------------------------------
def test_fsspec_filesystem(server: str, root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fsspec = pytest.importorskip("fsspec")
    monkeypatch.setenv("CALLFS_API_KEY", ALICE_KEY)
    hostport = server.removeprefix("http://")
    url = f"callfs://{hostport}{root}/data.bin"
    data = os.urandom(300 * KiB)
    with fsspec.open(url, "wb") as f:
        for i in range(0, len(data), 10_000):
            f.write(data[i : i + 10_000])
    with fsspec.open(url, "rb") as f:
        assert f.read() == data
    fs = fsspec.filesystem("callfs", base_url=server)
    assert type(fs).__name__ == "CallFSFileSystem"
    with fs.open(f"{root}/data.bin", block_size=4096) as f:
        f.seek(100_000)
        assert f.read(10) == data[100_000:100_010]
        f.seek(-5, 2)
        assert f.read() == data[-5:]
    assert fs.cat_file(f"{root}/data.bin", 7, 17) == data[7:17]
    info = fs.info(f"callfs://{hostport}{root}/data.bin")
    assert (info["name"], info["size"], info["type"]) == (f"{root}/data.bin", len(data), "file")
    fs.makedirs(f"{root}/dir/sub", exist_ok=True)
    fs.makedirs(f"{root}/dir/sub", exist_ok=True)
    with pytest.raises(FileExistsError):
        fs.makedirs(f"{root}/dir/sub")
    fs.pipe_file(f"{root}/dir/sub/p.txt", b"piped")
    assert sorted(fs.ls(root, detail=False)) == [f"{root}/data.bin", f"{root}/dir"]
    assert fs.find(root) == [f"{root}/data.bin", f"{root}/dir/sub/p.txt"]
    fs.mv(f"{root}/dir/sub/p.txt", f"{root}/moved/p.txt")
    assert fs.cat(f"{root}/moved/p.txt") == b"piped"
    assert fs.unstrip_protocol(f"{root}/moved/p.txt") == f"callfs://{hostport}{root}/moved/p.txt"
    with pytest.raises(RuntimeError), fs.open(f"{root}/aborted.bin", "wb") as f:
        f.write(b"x" * (6 * MiB))  # past one block: the PUT has started
        raise RuntimeError("abandon")
    assert not fs.exists(f"{root}/aborted.bin")
    with pytest.raises(FileNotFoundError):
        fs.info(f"{root}/nope")
    fs.rm(f"{root}/dir", recursive=True)
    assert not fs.exists(f"{root}/dir")
    # no host in the URL: CALLFS_URL names the server
    monkeypatch.setenv("CALLFS_URL", server)
    with fsspec.open(f"callfs:///{root.lstrip('/')}/moved/p.txt", "rb") as f:
        assert f.read() == b"piped"
    # refused when asked, not later (found by audit): appending lost the data at close, and a
    # directory read as b""
    with pytest.raises(NotImplementedError):
        fs.open(f"{root}/moved/p.txt", "ab")
    with pytest.raises(IsADirectoryError):
        fs.open(f"{root}/moved", "rb")
    with pytest.raises(ValueError):
        fs.client.read(f"{root}/moved/p.txt", -5, 10)
    # into an existing directory: inside it, as fsspec's mv and cp do (it was refused)
    fs.makedirs(f"{root}/box", exist_ok=True)
    fs.mv(f"{root}/moved/p.txt", f"{root}/box")
    assert fs.cat(f"{root}/box/p.txt") == b"piped" and not fs.exists(f"{root}/moved/p.txt")
    fs.mv(f"{root}/box/p.txt", f"{root}/moved/")
    assert fs.cat(f"{root}/moved/p.txt") == b"piped"


def test_pandas_csv_round_trip(server: str, root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    pd = pytest.importorskip("pandas")
    monkeypatch.setenv("CALLFS_API_KEY", ALICE_KEY)
    url = f"callfs://{server.removeprefix('http://')}{root}/table.csv"
    frame = pd.DataFrame({"n": range(500), "sq": [i * i for i in range(500)]})
    frame.to_csv(url, index=False)
    back = pd.read_csv(url)
    assert back.equals(frame)


# ---- fsspec's own abstract suite ---------------------------------------------------------------
class CallFSFixtures(abstract.AbstractFixtures):  # type: ignore[misc]
    @pytest.fixture
    def fs(self, server: str) -> Any:
        fsspec_fs = pytest.importorskip("callfs.client.fsspec_fs")
        return fsspec_fs.CallFSFileSystem(base_url=server, api_key=ALICE_KEY)

    @pytest.fixture
    def fs_path(self, fs: Any) -> Iterator[str]:
        path = f"/abstract-{uuid.uuid4().hex[:10]}"
        fs.mkdir(path)
        yield path
        if fs.exists(path):
            fs.rm(path, recursive=True)


class TestCallFSCopy(abstract.AbstractCopyTests, CallFSFixtures):  # type: ignore[misc]
    pass


class TestCallFSGet(abstract.AbstractGetTests, CallFSFixtures):  # type: ignore[misc]
    pass


class TestCallFSPut(abstract.AbstractPutTests, CallFSFixtures):  # type: ignore[misc]
    pass


class TestCallFSOpen(abstract.AbstractOpenTests, CallFSFixtures):  # type: ignore[misc]
    pass


class TestCallFSPipe(abstract.AbstractPipeTests, CallFSFixtures):  # type: ignore[misc]
    pass


def test_pandas_parquet_round_trip(server: str, root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Parquet reads seek to the footer first: the ranged reads of ``CallFSFile``."""
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    monkeypatch.setenv("CALLFS_API_KEY", ALICE_KEY)
    url = f"callfs://{server.removeprefix('http://')}{root}/table.parquet"
    frame = pd.DataFrame({"n": range(2000), "s": [f"row {i}" for i in range(2000)]})
    frame.to_parquet(url, index=False)
    assert pd.read_parquet(url).equals(frame)
    assert pd.read_parquet(url, columns=["n"])["n"].sum() == sum(range(2000))


def test_cli_rm_goes_on_mv_into_a_directory_and_put_stdin_size(
    cli_env: dict[str, str], client: Client, root: str
) -> None:
    """From the client audit: ``rm A B`` stopped at the first failure (B stayed); ``mv`` onto an
    existing directory was refused instead of moving into it as mv(1) does; ``put -`` reported
    size -1."""
    for name in ("a", "b"):
        client.upload(f"{root}/{name}", name.encode())
    out = run("rm", f"{root}/a", f"{root}/nope", f"{root}/b", code=1)
    assert f"Error: {root}/nope: FILE_NOT_FOUND" in out.stderr
    assert out.stdout.splitlines() == [f"deleted {root}/a", f"deleted {root}/b"]
    assert not client.exists(f"{root}/b")
    client.upload(f"{root}/c", b"c")
    doc = run_json("rm", f"{root}/c", f"{root}/nope", code=1)
    assert doc["deleted"] == [f"{root}/c"]
    assert [(f["path"], f["error"]["code"]) for f in doc["failed"]] == [
        (f"{root}/nope", "FILE_NOT_FOUND")
    ]

    client.upload(f"{root}/f.txt", b"f")
    client.upload(f"{root}/g.txt", b"g")
    client.mkdir(f"{root}/dir")
    assert run_json("mv", f"{root}/f.txt", f"{root}/dir")["path"] == f"{root}/dir/f.txt"
    moved = run_json("mv", "-p", f"{root}/g.txt", f"callfs:{root}/new/")
    assert moved["path"] == f"{root}/new/g.txt"
    client.mkdir(f"{root}/sub")
    assert run_json("mv", f"{root}/sub", f"{root}/dir")["path"] == f"{root}/dir/sub"
    client.mkdir(f"{root}/empty")
    moved = run_json("mv", "-T", "-f", f"{root}/new", f"{root}/empty")  # -T: DST itself
    assert moved["path"] == f"{root}/empty" and client.read(f"{root}/empty/g.txt") == b"g"
    assert client.read(f"{root}/dir/f.txt") == b"f"

    doc = json.loads(run("put", "-", f"{root}/in.bin", "--json", stdin=b"12345").stdout)
    assert doc["size"] == 5
    assert "(5 B)" in run("put", "-", f"{root}/in2.bin", stdin=b"abcde").stdout


def test_sync_ctrl_c_stops_running_transfers_at_their_next_chunk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """From the client audit: after Ctrl-C, ``sync`` waited for every running transfer to end
    (a large file: minutes) before it exited."""
    import click as click_module

    from callfs.client.commands import EXIT_INTERRUPTED, Ctx, Settings, _Job, _run_jobs

    echo = click_module.echo

    def slow_echo(*args: Any, **kwargs: Any) -> None:
        time.sleep(0.05)  # the window in which a stopped transfer's thread took a queued job
        echo(*args, **kwargs)

    monkeypatch.setattr(click_module, "echo", slow_echo)

    started = threading.Barrier(3)
    entered: list[str] = []
    ended: list[str] = []

    def work(job: _Job, progress: Callable[[int], None] | None) -> None:
        entered.append(job.rel)
        if job.rel in ("a", "b"):  # (a queued one that ran after Ctrl-C waited here 10 s)
            started.wait(timeout=10)
        try:
            for _ in range(300):  # 3 s unless stopped
                time.sleep(0.01)
                if progress is not None:
                    progress(1)
        finally:
            ended.append(job.rel)

    def interrupt() -> None:
        started.wait(timeout=10)
        time.sleep(0.2)
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)

    todo = [_Job(name, 3000, Path(name), "/" + name) for name in ("a", "b", "c", "d")]
    ctx = Ctx(Settings("http://127.0.0.1:1", "", False), as_json=True, quiet=True)
    threading.Thread(target=interrupt, daemon=True).start()
    began = time.monotonic()
    with pytest.raises(SystemExit) as info:
        _run_jobs(ctx, todo, 2, work, "up")
    assert info.value.code == EXIT_INTERRUPTED
    assert time.monotonic() - began < 2
    assert sorted(ended) == ["a", "b"]  # both running transfers stopped
    # c and d never began: a thread freed by a stopped transfer started a queued one (found by
    # audit; this test's 10 s flake)
    assert sorted(entered) == ["a", "b"]


def test_cli_api_key_with_a_cr_works_and_a_control_character_is_one_error_line(
    cli_env: dict[str, str], root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From a security audit: a key read from a file written on Windows ends in CR; the HTTP
    library refused the header with a traceback that quoted it, key included."""
    monkeypatch.setenv("CALLFS_API_KEY", ALICE_KEY + "\r\n")
    run("ls", root)  # surrounding whitespace dropped
    monkeypatch.setenv("CALLFS_API_KEY", ALICE_KEY[:8] + "\r" + ALICE_KEY[8:])
    out = run("ls", root, code=1)
    assert out.stderr.startswith("Error: ") and "Traceback" not in out.output
    assert ALICE_KEY[:8] not in out.output and ALICE_KEY[8:] not in out.output
