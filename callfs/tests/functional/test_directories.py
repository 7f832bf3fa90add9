"""``GET /v1/directories/{path}`` (API.md §9.10)."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from callfs.tests.functional.conftest import auth

Client = TestClient[Any, Any]


async def make(client: Client, *paths: str) -> None:
    for p in paths:
        resp = await client.post(f"/v1/files/{p}", data=b"x", headers=auth())
        assert resp.status in (200, 201), p


async def test_order_and_shape(client: Client) -> None:
    await make(client, "d/zeta.txt", "d/Alpha.txt", "d/beta/", "d/a_dir/", "d/é.txt", "d/.hidden")
    resp = await client.get("/v1/directories/d", headers=auth())
    assert resp.status == 200
    assert resp.headers["X-CallFS-Type"] == "directory"
    assert resp.headers["X-CallFS-Count"] == "6"
    assert resp.headers["X-CallFS-Recursive"] == "false"
    raw = await resp.text()
    assert raw.startswith('{"path":"/d","type":"directory","recursive":false,"count":6,"items":[')
    body = await resp.json()
    assert "max_depth" not in body
    assert [i["name"] for i in body["items"]] == [
        ".hidden",
        "Alpha.txt",
        "zeta.txt",
        "é.txt",
        "a_dir",
        "beta",
    ]
    first = body["items"][0]
    assert list(first) == ["name", "path", "type", "size", "mode", "owner", "mtime"]
    assert first["path"] == "/d/.hidden"
    assert first["size"] == 1
    assert first["mode"] == "0644"


async def test_recursive_depth_example(client: Client) -> None:
    await make(client, "a/b/c/deep.txt", "a/top.txt")
    resp = await client.get("/v1/directories/a?recursive=true&max_depth=1", headers=auth())
    body = await resp.json()
    assert body["recursive"] is True
    assert body["max_depth"] == 1
    assert [i["path"] for i in body["items"]] == ["/a/top.txt", "/a/b", "/a/b/c"]
    assert resp.headers["X-CallFS-Recursive"] == "true"

    resp = await client.get("/v1/directories/a?recursive=true", headers=auth())
    body = await resp.json()
    assert body["max_depth"] == 100
    assert [i["path"] for i in body["items"]] == ["/a/top.txt", "/a/b", "/a/b/c", "/a/b/c/deep.txt"]

    resp = await client.get("/v1/directories/a?recursive=true&max_depth=0", headers=auth())
    body = await resp.json()
    assert "max_depth" not in body
    assert [i["path"] for i in body["items"]] == ["/a/top.txt", "/a/b"]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("max_depth=-1", 100),
        ("max_depth=x", 100),
        ("max_depth=5000", 1000),
        ("", 100),
        # v1 parsed it with Go's strconv.Atoi (from an audit): -0 is 0, a sign is allowed, a
        # space or a number past 64 bits is unparsable
        ("max_depth=-0", 0),
        ("max_depth=%2B2", 2),
        ("max_depth=%201", 100),
        ("max_depth=1%20", 100),
        ("max_depth=99999999999999999999", 100),
        ("max_depth=9223372036854775807", 1000),
    ],
)
async def test_max_depth_parsing(client: Client, query: str, expected: int) -> None:
    await make(client, "m/x.txt")
    resp = await client.get(f"/v1/directories/m?recursive=true&{query}", headers=auth())
    assert (await resp.json()).get("max_depth", 0) == expected  # absent at 0 (§9.10)


async def test_recursive_must_be_exactly_true(client: Client) -> None:
    await make(client, "r/s/t.txt")
    resp = await client.get("/v1/directories/r?recursive=True", headers=auth())
    body = await resp.json()
    assert body["recursive"] is False
    assert [i["path"] for i in body["items"]] == ["/r/s"]


async def test_errors(client: Client) -> None:
    await make(client, "f.txt")
    resp = await client.get("/v1/directories/f.txt", headers=auth())
    assert resp.status == 400
    assert await resp.json() == {"code": "BAD_REQUEST", "message": "path is not a directory"}
    assert (await client.get("/v1/directories/missing", headers=auth())).status == 404
    assert (await client.get("/v1/directories/..%2Fx", headers=auth())).status == 400
    assert (await client.get("/v1/directories/")).status == 401


async def test_root_listing(client: Client) -> None:
    await make(client, "one.txt", "two/")
    for url in ("/v1/directories", "/v1/directories/", "/v1/directories/."):
        body = await (await client.get(url, headers=auth())).json()
        assert body["path"] == "/"
        assert [i["path"] for i in body["items"]] == ["/one.txt", "/two"]
