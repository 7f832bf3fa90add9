"""The server's own files under ``<root>/.callfs/`` are out of every client's reach (issue 10).

Client paths never map to disk paths (docs/storage-layout.md): a user who names ``.callfs``,
``.callfs/tmp``, ``.callfs/blobs/...`` or the old staging name ``.callfs-tmp`` just gets ordinary
namespace entries, whose bytes are fresh blobs. ``.erasure`` is reserved (API.md §6.1 step 10: 400).
Whatever a user does there, every file the server created is left as it was, other uploads keep
working, and a restart (start-up sweep) and an orphan sweep delete nothing the user stored.

The second half swaps a directory inside the root for a symlink to outside after a file was read
through it: the server never answers with the outside bytes (docs/security.md, threat model).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient

from callfs.daemon import Node
from callfs.log import configure_logging
from callfs.tests.functional.conftest import auth, make_config, raw_url, unreferenced_files

Client = TestClient[Any, Any]
OUTSIDE = b"OUTSIDE THE ROOT - never serve this"


def tree_snapshot(top: Path) -> dict[str, tuple[str, int, int, int]]:
    """Every entry below ``top``: kind, content hash (files), inode, mtime_ns."""
    snap: dict[str, tuple[str, int, int, int]] = {}
    for p in sorted(top.rglob("*")):
        st = p.lstat()
        if p.is_symlink():
            kind = "link:" + os.readlink(p)
        elif p.is_dir():
            kind = "dir"
        else:
            kind = "file:" + hashlib.sha256(p.read_bytes()).hexdigest()
        snap[str(p.relative_to(top))] = (kind, st.st_ino, st.st_mtime_ns, st.st_mode)
    return snap


class Server:
    """A node on ``tmp_path`` that can be stopped and started again (the start-up sweep)."""

    def __init__(self, tmp_path: Path, aiohttp_client: Callable[..., Any]) -> None:
        self.tmp_path = tmp_path
        self._make_client = aiohttp_client
        self.node: Node | None = None
        self.client: Client | None = None

    async def start(self) -> Client:
        node = Node(make_config(self.tmp_path))
        node.build()
        await node.start_components()
        self.node = node
        assert node.app is not None
        self.client = await self._make_client(node.app)
        return self.client

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.close()
            self.client = None
        if self.node is not None:
            await self.node.stop()
            self.node = None

    @property
    def root(self) -> Path:
        return self.tmp_path / "files"


@pytest.fixture
async def server(tmp_path: Path, aiohttp_client: Callable[..., Any]) -> AsyncIterator[Server]:
    s = Server(tmp_path, aiohttp_client)
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


async def blob_key_of(node: Node, path: str) -> str:
    assert node.meta is not None
    entry = await node.meta.get(path)
    assert entry is not None and entry.blob_key is not None
    return entry.blob_key


async def ws_upload(client: Client, path: str, data: bytes) -> tuple[list[str], int | None]:
    ws = await client.ws_connect(f"/v1/files/ws/{path}?mode=upload", headers=auth())
    await ws.send_bytes(data)
    await ws.send_str("EOF")
    texts = [m.data async for m in ws if m.type == WSMsgType.TEXT]
    return texts, ws.close_code


async def test_internal_names_reach_only_the_namespace(server: Server) -> None:
    client = server.client
    node = server.node
    assert client is not None and node is not None
    h = auth()

    # What the server stored itself before the user plays: a blob, and an upload in flight.
    assert (await client.post("/v1/files/keep.txt", data=b"keep me", headers=h)).status == 201
    key = await blob_key_of(node, "/keep.txt")
    in_flight = server.root / ".callfs" / "tmp" / f"{os.urandom(12).hex()}.part"
    in_flight.write_bytes(b"an upload being written")
    before = tree_snapshot(server.root / ".callfs")
    parent_before = tree_snapshot(server.tmp_path.parent)

    # Directories with the internal names are ordinary namespace directories.
    for d in (".callfs/", ".callfs/tmp/", ".callfs/blobs/", f".callfs/blobs/{key[:2]}/{key[2:4]}/"):
        resp = await client.post(f"/v1/files/{d}", headers=h)
        assert resp.status in (200, 201), (d, resp.status)
    # Files at the very names of server files: a new blob each, never the server's file.
    stored: dict[str, bytes] = {}
    for path, method in (
        (f".callfs/blobs/{key[:2]}/{key[2:4]}/{key}", "POST"),
        (f".callfs/tmp/{in_flight.name}", "PUT"),
        (".callfs/tmp/new.part", "PUT"),
        (".callfs-tmp/old-staging.part", "PUT"),
        (".callfs/replica/ab/cd/x", "POST"),
    ):
        body = f"user bytes for {path}".encode()
        resp = await client.request(method, f"/v1/files/{path}", data=body, headers=h)
        assert resp.status == 201, (path, resp.status, await resp.text())
        stored[path] = body
    for path, body in stored.items():
        resp = await client.get(f"/v1/files/{path}", headers=h)
        assert resp.status == 200 and await resp.read() == body, path
    assert await (await client.get("/v1/files/keep.txt", headers=h)).read() == b"keep me"
    # A listing shows the user's entries only, never the server's files.
    resp = await client.get("/v1/directories/.callfs/tmp", headers=h)
    names = sorted(i["name"] for i in (await resp.json())["items"])
    assert names == sorted([in_flight.name, "new.part"])

    # A WebSocket upload to such a path is an ordinary upload too.
    texts, code = await ws_upload(client, ".callfs/tmp/ws.part", b"over a websocket")
    assert (texts, code) == (["ok:16"], 1000)
    stored[".callfs/tmp/ws.part"] = b"over a websocket"

    # Moves into and out of the internal names (PATCH), renames there.
    assert (await client.post("/v1/files/mv.txt", data=b"moving", headers=h)).status == 201
    for src, body_json in (
        ("mv.txt", {"destination": ".callfs/tmp/mv.part"}),
        (".callfs/tmp/mv.part", {"name": "renamed.part"}),
        (".callfs/tmp/renamed.part", {"destination": ".callfs-tmp/from-internal.part"}),
        (".callfs-tmp", {"destination": ".callfs/blobs/moved-dir"}),
    ):
        resp = await client.patch(f"/v1/files/{src}", json=body_json, headers=h)
        assert resp.status == 200, (src, body_json, resp.status, await resp.text())
    stored.pop(".callfs-tmp/old-staging.part")
    stored[".callfs/blobs/moved-dir/old-staging.part"] = (
        b"user bytes for .callfs-tmp/old-staging.part"
    )
    stored[".callfs/blobs/moved-dir/from-internal.part"] = b"moving"
    for path, body in stored.items():
        assert await (await client.get(f"/v1/files/{path}", headers=h)).read() == body, path

    # `.erasure` is reserved: 400 however it is spelled, for every method and as a destination.
    for raw in (
        "/v1/files/.erasure/",
        "/v1/files/.erasure/x",
        "/v1/files/%2Eerasure/x",
        "/v1/files/a/../.erasure/x",
        "/v1/files/./.erasure",
        "/v1/directories/.erasure",
    ):
        for method in ("GET", "POST", "PUT", "DELETE"):
            if raw.startswith("/v1/directories") and method != "GET":
                continue
            resp = await client.session.request(method, raw_url(client, raw), data=b"e", headers=h)
            assert resp.status == 400, (method, raw, resp.status)
    resp = await client.patch(
        "/v1/files/keep.txt", json={"destination": ".erasure/keep.txt"}, headers=h
    )
    assert resp.status == 400
    resp = await client.post("/v1/links/generate", json={"path": ".erasure/x"}, headers=h)
    assert resp.status == 400
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await client.ws_connect("/v1/files/ws/.erasure/x?mode=upload", headers=h)
    assert info.value.status == 400
    assert not (server.root / ".erasure").exists()

    # Recursive deletes of the internal names remove only the user's entries and blobs.
    resp = await client.delete("/v1/files/.callfs?recursive=true", headers=h)
    assert resp.status == 204
    assert (await client.get("/v1/files/.callfs/tmp/new.part", headers=h)).status == 404
    assert await unreferenced_files(node) == [in_flight]

    # Every server file from before is untouched; every other upload still works.
    after = tree_snapshot(server.root / ".callfs")
    changed = {k: v for k, v in before.items() if v[0] != "dir" and after.get(k) != v}
    assert changed == {}
    missing_dirs = [k for k, v in before.items() if v[0] == "dir" and k not in after]
    assert missing_dirs == []
    assert await (await client.get("/v1/files/keep.txt", headers=h)).read() == b"keep me"
    assert (await client.put("/v1/files/after/x.bin", data=b"x" * 70_000, headers=h)).status == 201
    assert len(await (await client.get("/v1/files/after/x.bin", headers=h)).read()) == 70_000

    # Store again under the internal names, then restart (start-up sweep) and sweep orphans.
    survivors = {
        ".callfs/tmp/survivor.part": b"survive the sweep",
        ".callfs/blobs/aa/bb/" + "0" * 32: b"a user file named like a blob",
        ".callfs-tmp/x.part": b"old staging name",
    }
    for path, body in survivors.items():
        assert (await client.put(f"/v1/files/{path}", data=body, headers=h)).status == 201
    survivors["keep.txt"] = b"keep me"
    await server.stop()
    client = await server.start()
    node = server.node
    assert node is not None and node.engine is not None
    assert not in_flight.exists()  # the start-up sweep removes staged leftovers, as it should
    await node.engine.sweep_orphans(0.0)
    for path, body in survivors.items():
        resp = await client.get(f"/v1/files/{path}", headers=h)
        assert resp.status == 200 and await resp.read() == body, path
    assert await unreferenced_files(node) == []

    # Nothing outside the data root (beside the metadata store) was created or changed.
    parent_after = tree_snapshot(server.tmp_path.parent)
    prefix = server.tmp_path.name + "/"
    outside = {
        k
        for k in set(parent_before) | set(parent_after)
        if not k.startswith(prefix + "files")
        and not k.startswith(prefix + "meta.sqlite3")
        and k != server.tmp_path.name
        and parent_before.get(k) != parent_after.get(k)
    }
    assert outside == set()


# ---- a directory swapped for a symlink after it was read through ------------------------------
def plant_outside(tmp_path: Path, rel_file: str) -> Path:
    planted = tmp_path / "outside" / rel_file
    planted.parent.mkdir(parents=True, exist_ok=True)
    planted.write_bytes(OUTSIDE)
    return planted


def swap(root: Path, rel_dir: str, target: Path) -> None:
    os.rename(root / rel_dir, root / f"moved-away-{os.urandom(4).hex()}")
    (root / rel_dir).symlink_to(target, target_is_directory=True)


async def assert_never_outside(client: Client, path: str, planted: Path) -> None:
    h = auth()
    for headers in (h, {**h, "Range": "bytes=0-4"}):
        resp = await client.get(f"/v1/files/{path}", headers=headers)
        body = await resp.read()
        assert resp.status not in (200, 206), (resp.status, body)
        assert OUTSIDE[:5] not in body
    ws = await client.ws_connect(f"/v1/files/ws/{path}", headers=h)
    got = b"".join([m.data async for m in ws if m.type == WSMsgType.BINARY])
    assert OUTSIDE[:5] not in got
    resp = await client.post(
        "/v1/links/generate", json={"path": path, "expiry_seconds": 60}, headers=h
    )
    if resp.status == 201:
        token = (await resp.json())["token"]
        body = await (await client.get(f"/download/{token}")).read()
        assert OUTSIDE[:5] not in body
    await client.delete(f"/v1/files/{path}", headers=h)
    assert planted.read_bytes() == OUTSIDE


@pytest.mark.parametrize("swapped", ["old", "old/dir"])
async def test_legacy_file_parent_swapped_for_symlink(
    server: Server, tmp_path: Path, swapped: str
) -> None:
    """A file written by an older version (its key is its namespace path, bytes in place)."""
    client, node = server.client, server.node
    assert client is not None and node is not None
    h = auth()
    assert (
        await client.post("/v1/files/old/dir/file.txt", data=b"inside", headers=h)
    ).status == 201
    # Make it a legacy entry, as the schema migration does: bytes at <root><path>, key = path.
    legacy = server.root / "old" / "dir" / "file.txt"
    legacy.parent.mkdir(parents=True)
    legacy.write_bytes(b"inside")
    with sqlite3.connect(tmp_path / "meta.sqlite3") as db:
        db.execute(
            "UPDATE entries SET blob_key = 'old/dir/file.txt' WHERE path = '/old/dir/file.txt'"
        )
    assert await blob_key_of(node, "/old/dir/file.txt") == "old/dir/file.txt"
    for _ in range(2):  # warm any memo of verified directories
        resp = await client.get("/v1/files/old/dir/file.txt", headers=h)
        assert resp.status == 200 and await resp.read() == b"inside"
    rel_below = str(Path("old/dir/file.txt").relative_to(swapped))
    planted = plant_outside(tmp_path, rel_below)
    swap(server.root, swapped, tmp_path / "outside")
    await assert_never_outside(client, "old/dir/file.txt", planted)


@pytest.mark.parametrize("depth", [0, 1, 2, 3])
async def test_blob_fanout_swapped_for_symlink(server: Server, tmp_path: Path, depth: int) -> None:
    client, node = server.client, server.node
    assert client is not None and node is not None
    h = auth()
    assert (await client.post("/v1/files/f.bin", data=b"inside", headers=h)).status == 201
    key = await blob_key_of(node, "/f.bin")
    for _ in range(2):
        resp = await client.get("/v1/files/f.bin", headers=h)
        assert resp.status == 200 and await resp.read() == b"inside"
    parts = [".callfs", "blobs", key[:2], key[2:4]]
    rel_dir = "/".join(parts[: depth + 1])
    rel_below = "/".join([*parts[depth + 1 :], key])
    planted = plant_outside(tmp_path, rel_below)
    swap(server.root, rel_dir, tmp_path / "outside")
    await assert_never_outside(client, "f.bin", planted)


# ---- requests aiohttp's parser refuses: one warning line each, no traceback --------------------
PARSER_REFUSALS = {
    "raw-non-ascii-target": b"GET /v1/files/\xc3\xa9-echo HTTP/1.1\r\nHost: x\r\n\r\n",
    "bad-header-name": b"GET /health HTTP/1.1\r\nHost: x\r\nBad Name-echo: 1\r\n\r\n",
    "bad-version": b"GET /health-echo HTTP/9.9\r\nHost: x\r\n\r\n",
    "long-header": b"GET /health HTTP/1.1\r\nHost: x\r\nX-echo: " + b"a" * 9000 + b"\r\n\r\n",
}


async def test_refused_requests_log_one_warning_without_traceback(
    server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    """Any client can send these: each is one WARNING line naming no request bytes, while other
    ``aiohttp.server`` errors keep their traceback (logging as configured by ``callfs server``)."""
    client = server.client
    assert client is not None
    root, aiohttp_server = logging.getLogger(), logging.getLogger("aiohttp.server")
    saved = (list(root.handlers), root.level, list(aiohttp_server.filters))
    try:
        configure_logging("warn", "json")
        for raw in PARSER_REFUSALS.values():
            reader, writer = await asyncio.open_connection(client.host, client.port)
            writer.write(raw)
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            assert answer.split(b"\r\n", 1)[0].split(b" ")[1] == b"400", answer[:200]
        try:
            raise RuntimeError("a handler bug")
        except RuntimeError:
            aiohttp_server.exception("Error handling request from %s", "127.0.0.1")
        err = capsys.readouterr().err
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        aiohttp_server.filters[:] = saved[2]
    records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    from_server = [r for r in records if r["logger"] == "aiohttp.server"]
    refused, other = from_server[:-1], from_server[-1]
    assert len(refused) == len(PARSER_REFUSALS), err
    for record in refused:
        assert record["level"] == "warning", record
        assert "error" not in record, record  # no traceback
        assert "\n" not in record["msg"], record
        # (not the time stamp: "03:08:49.936Z" holds "9.9", which failed this test in CI once)
        fields = {k: v for k, v in record.items() if k != "time"}
        for echoed in ("echo", "\u00e9", "aaaa", "9.9", "Bad Name"):
            assert echoed not in json.dumps(fields, ensure_ascii=False), record
    assert "Traceback" not in "".join(json.dumps(r) for r in refused)
    assert other["level"] == "error" and "Traceback" in other["error"], other
    assert "a handler bug" in other["error"]
