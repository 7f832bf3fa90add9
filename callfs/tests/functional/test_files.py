"""``/v1/files/{path}`` through the aiohttp test client against a real SQLite + localfs node."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from multidict import CIMultiDict

from callfs.daemon import Node
from callfs.tests.functional.conftest import (
    BOB_KEY,
    INTERNAL,
    auth,
    raw_url,
    stored_bytes,
    unreferenced_files,
)

Client = TestClient[Any, Any]


async def post(client: Client, path: str, data: bytes = b"", key: str | None = None) -> Any:
    return await client.post(f"/v1/files/{path}", data=data, headers=auth(key) if key else auth())


def files_root(node: Node) -> Path:
    return Path(node.cfg.backend.localfs_root_path)


# ---- create / read --------------------------------------------------------------------------
async def test_post_then_get_and_head(client: Client, node: Node) -> None:
    resp = await post(client, "docs/hello.txt", b"hello world")
    assert resp.status == 201
    assert await resp.read() == b""

    resp = await client.get("/v1/files/docs/hello.txt", headers=auth())
    assert resp.status == 200
    assert await resp.read() == b"hello world"
    h = resp.headers
    assert h["Content-Type"] == "application/octet-stream"
    assert h["Content-Length"] == "11"
    assert h["Accept-Ranges"] == "bytes"
    assert h["X-CallFS-Type"] == "file"
    assert h["X-CallFS-Size"] == "11"
    assert h["X-CallFS-Mode"] == "0644"
    assert h["X-CallFS-Owner"] == "alice"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", h["X-CallFS-MTime"])
    assert await stored_bytes(node, "/docs/hello.txt") == b"hello world"

    resp = await client.head("/v1/files/docs/hello.txt", headers=auth())
    assert resp.status == 200
    assert await resp.read() == b""
    assert resp.headers["Content-Type"] == "application/octet-stream"
    assert resp.headers["X-CallFS-Instance-ID"] == "callfs-instance-1"
    assert resp.headers["Accept-Ranges"] == "bytes"
    assert resp.headers["X-CallFS-Size"] == "11"

    resp = await client.head("/v1/files/docs", headers=auth())
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "application/json"
    assert resp.headers["X-CallFS-Type"] == "directory"
    assert resp.headers["X-CallFS-Mode"] == "0755"
    assert resp.headers["X-CallFS-Size"] == "0"
    assert "Accept-Ranges" not in resp.headers


async def test_head_errors_have_no_body(client: Client) -> None:
    resp = await client.head("/v1/files/missing", headers=auth())
    assert resp.status == 404
    assert await resp.read() == b""
    resp = await client.session.head(raw_url(client, "/v1/files/a/../.."), headers=auth())
    assert resp.status == 400


async def test_root_item(client: Client) -> None:
    resp = await client.head("/v1/files", headers=auth())
    assert resp.status == 200
    assert resp.headers["X-CallFS-Owner"] == "root"
    assert "X-CallFS-Instance-ID" not in resp.headers
    resp = await client.get("/v1/files/", headers=auth())
    assert resp.status == 200
    assert await resp.json() == []


async def test_create_conflicts(client: Client) -> None:
    assert (await post(client, "f.txt", b"one")).status == 201
    resp = await post(client, "f.txt", b"two")
    assert resp.status == 409
    assert await resp.json() == {
        "code": "FILE_ALREADY_EXISTS",
        "message": "file already exists, use PUT to update",
    }
    assert await (await client.get("/v1/files/f.txt", headers=auth())).read() == b"one"

    assert (await post(client, "d/")).status == 201
    resp = await post(client, "d/")
    assert resp.status == 200
    assert await resp.read() == b""
    resp = await post(client, "d", b"x")
    assert resp.status == 409
    assert (await resp.json())["message"] == "path exists as directory, cannot create file"
    resp = await post(client, "f.txt/")
    assert resp.status == 409
    assert (await resp.json())["message"] == "path exists as file, cannot create directory"
    resp = await post(client, "f.txt/child", b"x")
    assert resp.status == 409
    assert (await resp.json())["code"] == "FILE_ALREADY_EXISTS"


async def test_parents_are_created_and_owned_by_the_creator(client: Client) -> None:
    assert (await post(client, "a/b/c/deep.txt", b"x", key=BOB_KEY)).status == 201
    resp = await client.get("/v1/directories/a", headers=auth())
    items = (await resp.json())["items"]
    assert [(i["path"], i["owner"], i["mode"]) for i in items] == [("/a/b", "bob", "0755")]


async def test_empty_and_chunked_bodies(client: Client) -> None:
    assert (await post(client, "empty", b"")).status == 201
    resp = await client.get("/v1/files/empty", headers=auth())
    assert resp.headers["Content-Length"] == "0"
    assert await resp.read() == b""

    async def gen() -> AsyncIterator[bytes]:
        for i in range(10):
            yield bytes([i]) * 10000

    resp = await client.post("/v1/files/chunked.bin", data=gen(), headers=auth())
    assert resp.status == 201
    resp = await client.get("/v1/files/chunked.bin", headers=auth())
    assert await resp.read() == b"".join(bytes([i]) * 10000 for i in range(10))
    assert resp.headers["X-CallFS-Size"] == "100000"


async def test_large_file_round_trip(client: Client) -> None:
    blob = os.urandom(3 * 1024 * 1024 + 7)
    resp = await client.put("/v1/files/big.bin", data=io.BytesIO(blob), headers=auth())
    assert resp.status == 201
    resp = await client.get("/v1/files/big.bin", headers=auth())
    assert resp.status == 200
    assert resp.headers["Content-Length"] == str(len(blob))
    got = await resp.read()
    assert hashlib.sha256(got).digest() == hashlib.sha256(blob).digest()
    resp = await client.get(
        "/v1/files/big.bin", headers={**auth(), "Range": "bytes=1000000-2999999"}
    )
    assert resp.status == 206
    assert await resp.read() == blob[1000000:3000000]


# ---- ranges ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("header", "status", "body", "content_range"),
    [
        ("bytes=0-4", 206, b"01234", "bytes 0-4/10"),
        ("bytes=5-", 206, b"56789", "bytes 5-9/10"),
        ("bytes=-3", 206, b"789", "bytes 7-9/10"),
        ("bytes=8-100", 206, b"89", "bytes 8-9/10"),
        ("bytes=-100", 206, b"0123456789", "bytes 0-9/10"),
        ("bytes=10-", 416, None, "bytes */10"),
        ("bytes=0-1,3-4", 200, b"0123456789", None),
        ("bytes=abc", 200, b"0123456789", None),
        ("items=0-1", 200, b"0123456789", None),
    ],
)
async def test_ranges(
    client: Client, header: str, status: int, body: bytes | None, content_range: str | None
) -> None:
    await post(client, "r.txt", b"0123456789")
    resp = await client.get("/v1/files/r.txt", headers={**auth(), "Range": header})
    assert resp.status == status
    if body is not None:
        assert await resp.read() == body
        assert resp.headers["Content-Length"] == str(len(body))
    else:
        assert (await resp.json())["code"] == "RANGE_NOT_SATISFIABLE"
    assert resp.headers.get("Content-Range") == content_range


async def test_if_range_and_empty_file_ranges(client: Client) -> None:
    await post(client, "r.txt", b"0123456789")
    resp = await client.get(
        "/v1/files/r.txt", headers={**auth(), "Range": "bytes=0-1", "If-Range": "x"}
    )
    assert resp.status == 200
    await post(client, "e.txt", b"")
    resp = await client.get("/v1/files/e.txt", headers={**auth(), "Range": "bytes=0-"})
    assert resp.status == 416
    assert resp.headers["Content-Range"] == "bytes */0"


async def test_two_range_fields_are_two_ranges_the_full_200(client: Client) -> None:
    """§9.3: multiple ranges get the full 200, also when each comes in a field of its own (the
    first field alone was served as a 206)."""
    await post(client, "r.txt", b"0123456789")
    headers = CIMultiDict([*auth().items(), ("Range", "bytes=0-1"), ("Range", "bytes=3-4")])
    resp = await client.get("/v1/files/r.txt", headers=headers)
    assert resp.status == 200
    assert await resp.read() == b"0123456789"
    assert "Content-Range" not in resp.headers


# ---- PUT ------------------------------------------------------------------------------------
async def test_put_create_replace_and_refusals(client: Client) -> None:
    resp = await client.put("/v1/files/p.txt", data=b"v1", headers=auth())
    assert resp.status == 201
    first = (await client.head("/v1/files/p.txt", headers=auth())).headers["X-CallFS-MTime"]
    resp = await client.put("/v1/files/p.txt", data=b"version two", headers=auth())
    assert resp.status == 200
    resp = await client.get("/v1/files/p.txt", headers=auth())
    assert await resp.read() == b"version two"
    assert resp.headers["X-CallFS-Size"] == "11"
    assert resp.headers["X-CallFS-MTime"] >= first

    resp = await client.put("/v1/files/p.txt/", data=b"x", headers=auth())
    assert resp.status == 400
    await post(client, "dir/")
    resp = await client.put("/v1/files/dir", data=b"x", headers=auth())
    assert resp.status == 400
    assert (await resp.json())["message"] == "path is a directory"


async def test_concurrent_puts_leave_one_whole_version(client: Client) -> None:
    bodies = [bytes([i]) * 200_000 for i in range(12)]
    results = await asyncio.gather(
        *(client.put("/v1/files/race.bin", data=b, headers=auth()) for b in bodies)
    )
    assert sorted(r.status for r in results) == [200] * 11 + [201]
    got = await (await client.get("/v1/files/race.bin", headers=auth())).read()
    assert got in bodies


async def test_concurrent_posts_exactly_one_wins(client: Client) -> None:
    results = await asyncio.gather(
        *(client.post("/v1/files/once.txt", data=b"x" * i, headers=auth()) for i in range(10))
    )
    assert sorted(r.status for r in results) == [201] + [409] * 9


# ---- permissions ----------------------------------------------------------------------------
async def test_owner_model(client: Client) -> None:
    await post(client, "shared/alice.txt", b"a")
    bob = auth(BOB_KEY)
    assert (await client.get("/v1/files/shared/alice.txt", headers=bob)).status == 200
    resp = await client.put("/v1/files/shared/alice.txt", data=b"b", headers=bob)
    assert resp.status == 403
    assert await resp.json() == {"code": "PERMISSION_DENIED", "message": "permission denied"}
    assert (await client.delete("/v1/files/shared/alice.txt", headers=bob)).status == 403
    # a directory owned by someone else may be written into, not deleted
    assert (await client.post("/v1/files/shared/bob.txt", data=b"b", headers=bob)).status == 201
    assert (await client.delete("/v1/files/shared", headers=bob)).status == 403
    # the internal secret is an admin identity
    admin = {"Authorization": f"Bearer {INTERNAL}"}
    assert (await client.put("/v1/files/shared/alice.txt", data=b"z", headers=admin)).status == 200
    resp = await client.get("/v1/files/shared/alice.txt", headers=auth())
    assert resp.headers["X-CallFS-Owner"] == "alice"  # owner unchanged by an update
    # writing under someone else's FILE is denied before the 409
    resp = await client.post("/v1/files/shared/alice.txt/x", data=b"b", headers=bob)
    assert resp.status == 403


async def test_missing_target_read_is_404(client: Client) -> None:
    resp = await client.get("/v1/files/nope/nope", headers=auth())
    assert resp.status == 404
    assert (await resp.json())["code"] == "FILE_NOT_FOUND"


async def test_a_truncated_blob_is_never_served_as_the_whole_file(
    client: Client, node: Node
) -> None:
    """Found by audit: a blob cut short on disk answered 200 with a Content-Length of what was
    left (curl exits 0: the client takes it for the whole file), and a Range 206 with a short
    Content-Range. Bytes missing from the backend are a 404 (§9.3); HEAD answers from metadata."""
    body = os.urandom(200_000)
    assert (await client.put("/v1/files/cut.bin", data=body, headers=auth())).status == 201
    assert node.meta is not None
    entry = await node.meta.get("/cut.bin")
    assert entry is not None and entry.blob_key is not None
    key = entry.blob_key
    blob = Path(node.cfg.backend.localfs_root_path) / ".callfs" / "blobs" / key[:2] / key[2:4] / key
    os.truncate(blob, 1000)
    for headers in ({}, {"Range": "bytes=500-5000"}):
        resp = await client.get("/v1/files/cut.bin", headers={**auth(), **headers})
        assert resp.status == 404, (headers, resp.status)
        assert (await resp.json())["code"] == "FILE_NOT_FOUND"
    # a range wholly inside what is left is served: those bytes are right
    resp = await client.get("/v1/files/cut.bin", headers={**auth(), "Range": "bytes=0-99"})
    assert resp.status == 206 and await resp.read() == body[:100]
    resp = await client.head("/v1/files/cut.bin", headers=auth())
    assert resp.status == 200 and resp.headers["Content-Length"] == str(len(body))


# ---- paths ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "raw",
    [
        "..",
        "../x",
        "a/../..",
        "..%2F..%2Fetc%2Fpasswd",
        "test%5Cfile.txt",
        "test%00file.txt",
        "a%2Fb",
        "bad%zz",
        "%FF",
        ".erasure/x",
        "x" * 256,
        "a%E2%80%AEb",
    ],
)
async def test_invalid_paths_are_400_and_change_nothing(client: Client, raw: str) -> None:
    resp = await client.session.post(raw_url(client, f"/v1/files/{raw}"), data=b"x", headers=auth())
    assert resp.status == 400, raw
    assert (await resp.json())["code"] == "BAD_REQUEST"
    listing = await (await client.get("/v1/directories/", headers=auth())).json()
    assert listing["items"] == []


async def test_percent_decoding(client: Client) -> None:
    for raw, name in [
        ("file%20with%20spaces.txt", "file with spaces.txt"),
        ("file%2Bplus.txt", "file+plus.txt"),
        ("a+b.txt", "a+b.txt"),
        ("%252e%252e%252f", "%2e%2e%2f"),
        ("test%EF%BC%8Ffile.txt", "test／file.txt"),
    ]:
        assert (await post(client, raw, b"x")).status == 201, raw
        resp = await client.get("/v1/directories/", headers=auth())
        assert name in [i["name"] for i in (await resp.json())["items"]]
    url = raw_url(client, "/v1/files/a//./b/../../file%20with%20spaces.txt")
    resp = await client.session.get(url, headers=auth())
    assert resp.status == 200


# ---- size limits and failed uploads ---------------------------------------------------------
@pytest.mark.parametrize("config_env", [{"CALLFS_SERVER__MAX_UPLOAD_SIZE": "1000"}])
async def test_upload_size_limit(client: Client, node: Node) -> None:
    resp = await post(client, "big", b"x" * 1001)
    assert resp.status == 413
    assert (await resp.json())["code"] == "PAYLOAD_TOO_LARGE"

    async def gen() -> AsyncIterator[bytes]:
        for _ in range(5):
            yield b"y" * 300

    resp = await client.put("/v1/files/big2", data=gen(), headers=auth())
    assert resp.status == 413
    assert (await post(client, "ok", b"x" * 1000)).status == 201
    for name in ("big", "big2"):
        assert (await client.get(f"/v1/files/{name}", headers=auth())).status == 404
    assert await unreferenced_files(node) == []


async def test_interrupted_upload_leaves_nothing(client: Client, node: Node) -> None:
    server = client.server
    _reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(
        b"PUT /v1/files/partial.bin HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Bearer " + auth()["Authorization"][7:].encode() + b"\r\n"
        b"Content-Length: 1000000\r\n\r\n" + b"z" * 5000
    )
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.close()
    await asyncio.sleep(0.3)
    assert (await client.get("/v1/files/partial.bin", headers=auth())).status == 404
    assert await unreferenced_files(node) == []


# ---- DELETE ---------------------------------------------------------------------------------
async def test_delete(client: Client, node: Node) -> None:
    await post(client, "d/f.txt", b"x")
    resp = await client.delete("/v1/files/d", headers=auth())
    assert resp.status == 409
    assert (await resp.json())["code"] == "DIRECTORY_NOT_EMPTY"
    resp = await client.delete("/v1/files/d/f.txt?recursive=true", headers=auth())
    assert resp.status == 204
    assert await resp.read() == b""
    assert (await client.delete("/v1/files/d/f.txt", headers=auth())).status == 404
    assert (await client.delete("/v1/files/d/", headers=auth())).status == 204
    assert await unreferenced_files(node) == []
    assert not [p for p in files_root(node).rglob("*") if p.is_file()]


async def test_recursive_delete_is_all_or_nothing(client: Client, node: Node) -> None:
    await post(client, "t/a/1.txt", b"1")
    await post(client, "t/b/2.txt", b"2")
    await post(client, "t/b/bob.txt", b"3", key=BOB_KEY)
    assert (await client.delete("/v1/files/t?recursive=yes", headers=auth())).status == 409
    assert (await client.delete("/v1/files/t?recursive=true", headers=auth())).status == 403
    assert (await client.get("/v1/files/t/a/1.txt", headers=auth())).status == 200
    admin = {"Authorization": f"Bearer {INTERNAL}"}
    assert (await client.delete("/v1/files/t?recursive=true", headers=admin)).status == 204
    assert (await client.get("/v1/files/t", headers=auth())).status == 404
    assert not [p for p in files_root(node).rglob("*") if p.is_file()]


async def test_root_delete(client: Client) -> None:
    await post(client, "x/y.txt", b"1")
    assert (await client.delete("/v1/files/?recursive=true", headers=auth())).status == 403
    admin = {"Authorization": f"Bearer {INTERNAL}"}
    assert (await client.delete("/v1/files/?recursive=true", headers=admin)).status == 204
    resp = await client.get("/v1/files/", headers=auth())
    assert resp.status == 200
    assert await resp.json() == []


# ---- PATCH ----------------------------------------------------------------------------------
async def patch(client: Client, path: str, body: Any, key: str | None = None) -> Any:
    return await client.patch(f"/v1/files/{path}", json=body, headers=auth(key) if key else auth())


async def test_rename_and_move(client: Client, node: Node) -> None:
    await post(client, "src/a.txt", b"A")
    resp = await patch(client, "src/a.txt", {"name": "b.txt"})
    assert resp.status == 200
    assert await resp.read() == b'{"path":"/src/b.txt"}\n'
    assert await (await client.get("/v1/files/src/b.txt", headers=auth())).read() == b"A"
    assert (await client.get("/v1/files/src/a.txt", headers=auth())).status == 404

    await post(client, "src/sub/deep.txt", b"D")
    resp = await patch(client, "src", {"destination": "/moved", "create_parents": False})
    assert resp.status == 200
    assert await resp.json() == {"path": "/moved"}
    assert await (await client.get("/v1/files/moved/sub/deep.txt", headers=auth())).read() == b"D"
    assert await stored_bytes(node, "/moved/sub/deep.txt") == b"D"
    listing = await (
        await client.get("/v1/directories/moved?recursive=true", headers=auth())
    ).json()
    assert [i["path"] for i in listing["items"]] == [
        "/moved/b.txt",
        "/moved/sub",
        "/moved/sub/deep.txt",
    ]


async def test_patch_refusals(client: Client) -> None:
    await post(client, "a.txt", b"A")
    await post(client, "b.txt", b"B")
    await post(client, "dir/inner.txt", b"I")
    cases: list[tuple[str, Any, int]] = [
        ("a.txt", {"name": "b.txt"}, 409),
        ("a.txt", {"name": "x", "destination": "/y"}, 400),
        ("a.txt", {}, 400),
        ("a.txt", {"name": ""}, 400),
        ("a.txt", {"name": "a/b"}, 400),
        ("a.txt", {"name": ".."}, 400),
        ("a.txt", {"name": 5}, 400),
        ("a.txt", {"destination": "/nope/a.txt"}, 400),
        ("a.txt", {"destination": "/a.txt"}, 400),
        ("a.txt", {"destination": "/"}, 400),
        ("a.txt", {"destination": "/c.txt", "backend": "tape"}, 400),
        ("a.txt", {"destination": "/c.txt", "instance": "ghost"}, 400),
        ("dir", {"destination": "/dir/sub"}, 400),
        ("dir", {"destination": "/a.txt", "overwrite": True}, 409),
        ("missing", {"name": "z"}, 404),
    ]
    for path, body, status in cases:
        resp = await patch(client, path, body)
        assert resp.status == status, (path, body, await resp.text())
    resp = await client.patch("/v1/files/a.txt", data=b"{nope", headers=auth())
    assert resp.status == 400
    assert (await resp.json())["message"] == "invalid JSON body"
    resp = await client.patch("/v1/files/a.txt", data=b"[1]", headers=auth())
    assert resp.status == 400
    assert (await patch(client, "a.txt", {"name": "b.txt"}, key=BOB_KEY)).status == 403


async def test_patch_overwrite_and_create_parents(client: Client) -> None:
    await post(client, "a.txt", b"A")
    await post(client, "b.txt", b"B")
    resp = await client.patch(
        "/v1/files/a.txt?overwrite=true", json={"name": "b.txt"}, headers=auth()
    )
    assert resp.status == 200
    assert await (await client.get("/v1/files/b.txt", headers=auth())).read() == b"A"
    resp = await patch(client, "b.txt", {"destination": "new/deep/b.txt", "create_parents": True})
    assert resp.status == 200
    assert await (await client.get("/v1/files/new/deep/b.txt", headers=auth())).read() == b"A"
    await post(client, "full/x", b"x")
    await post(client, "d2/")
    resp = await patch(client, "d2", {"destination": "/full", "overwrite": True})
    assert resp.status == 409
    assert (await resp.json())["code"] == "DIRECTORY_NOT_EMPTY"


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/v1/files/s.txt", '{"name":"\\ud800"}'),
        ("/v1/files/s.txt", '{"destination":"/q\\udfffx"}'),
        ("/v1/links/generate", '{"path":"/s\\ud800.txt"}'),
    ],
)
async def test_a_lone_surrogate_in_a_body_path_is_400(
    client: Client, route: str, body: str
) -> None:
    """JSON can carry a lone surrogate, which no UTF-8 path can hold (it was a 500)."""
    await post(client, "s.txt", b"S")
    method = client.patch if route.startswith("/v1/files") else client.post
    headers = {**auth(), "Content-Type": "application/json"}
    resp = await method(route, data=body.encode(), headers=headers)
    assert resp.status == 400, await resp.text()
    assert (await resp.json())["code"] == "BAD_REQUEST"
    assert await (await client.get("/v1/files/s.txt", headers=auth())).read() == b"S"


async def test_a_json_body_may_start_with_a_bom(client: Client) -> None:
    """RFC 8259 lets a parser ignore a byte order mark; Python's json.loads of bytes did."""
    await post(client, "s.txt", b"S")
    body = b"\xef\xbb\xbf" + b'{"name":"t.txt"}'
    headers = {**auth(), "Content-Type": "application/json"}
    resp = await client.patch("/v1/files/s.txt", data=body, headers=headers)
    assert resp.status == 200, await resp.text()


@pytest.mark.parametrize(
    "body",
    [
        b'{"name":"x.txt","n":NaN}',
        b'{"name":"x.txt","n":-Infinity}',
        '{"name":"x.txt"}'.encode("utf-16"),
    ],
)
async def test_patch_body_must_be_strict_json(client: Client, body: bytes) -> None:
    await post(client, "s.txt", b"S")
    headers = {**auth(), "Content-Type": "application/json"}
    resp = await client.patch("/v1/files/s.txt", data=body, headers=headers)
    assert resp.status == 400
    assert (await resp.json())["message"] == "invalid JSON body"
    assert await (await client.get("/v1/files/s.txt", headers=auth())).read() == b"S"


async def test_patch_overwrite_needs_write_on_the_destination_only(client: Client) -> None:
    """API.md §5: PATCH needs delete on the source and write on the destination. Someone else's
    directory may be written, so an empty one can be overwritten; someone else's file may not."""
    await post(client, "alices-dir/")
    await post(client, "alices.txt", b"A")
    await post(client, "bobs-dir/", key=BOB_KEY)
    await post(client, "bobs.txt", b"B", key=BOB_KEY)
    bob = auth(BOB_KEY)
    resp = await client.patch(
        "/v1/files/bobs.txt", json={"destination": "/alices.txt", "overwrite": True}, headers=bob
    )
    assert resp.status == 403
    resp = await client.patch(
        "/v1/files/bobs-dir", json={"destination": "/alices-dir", "overwrite": True}, headers=bob
    )
    assert resp.status == 200, await resp.text()
    listing = await (await client.get("/v1/files/", headers=auth())).json()
    assert {i["name"]: i["owner"] for i in listing}["alices-dir"] == "bob"


@pytest.mark.parametrize("config_env", [{"CALLFS_SERVER__READ_TIMEOUT": "400ms"}])
async def test_body_stall_is_bounded_by_read_timeout(client: Client, node: Node) -> None:
    server = client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(
        b"PUT /v1/files/stalled.bin HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Bearer " + auth()["Authorization"][7:].encode() + b"\r\n"
        b"Content-Length: 100000\r\n\r\n" + b"s" * 1000
    )
    await writer.drain()
    started = asyncio.get_running_loop().time()
    head = await asyncio.wait_for(reader.read(4096), 10)
    assert asyncio.get_running_loop().time() - started < 5
    assert head.startswith(b"HTTP/1.1 400")
    writer.close()
    assert (await client.get("/v1/files/stalled.bin", headers=auth())).status == 404
    assert await unreferenced_files(node) == []

    # a slow but steady upload is fine: the timeout bounds stalls, not the transfer
    async def slow() -> AsyncIterator[bytes]:
        for _ in range(6):
            await asyncio.sleep(0.2)
            yield b"t" * 1000

    resp = await client.put("/v1/files/slow.bin", data=slow(), headers=auth())
    assert resp.status == 201
