"""Listing pagination and streamed listings (API.md §22): ``limit``/``after``/``next``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from callfs.api.errors import dumps
from callfs.api.files import LISTING_PAGE, entry_json
from callfs.daemon import Node
from callfs.errors import Unavailable
from callfs.model import BackendType, Entry, EntryType
from callfs.tests.functional.conftest import auth

Client = TestClient[Any, Any]

#: Files before directories, then code points: "zz" < "é" < U+FFFF < U+1F600.
NAMES = ["Alpha", "a b", "zeta", "é", "\uffff", "\U0001f600"]
DIRS = ["A", "a", "zz", "édir"]


async def make(client: Client, *paths: str) -> None:
    for p in paths:
        resp = await client.post(f"/v1/files/{p}", data=b"x", headers=auth())
        assert resp.status in (200, 201), p


async def mixed(client: Client) -> list[str]:
    await make(client, *(f"p/{n}" for n in NAMES), *(f"p/{n}/" for n in DIRS), "p/a/inner")
    return NAMES + DIRS


async def bulk(node: Node, directory: str, files: int, dirs: int) -> None:
    """Children made straight in the store (fast), owned by alice like her directory."""
    assert node.meta is not None

    def one(name: str, kind: EntryType) -> Entry:
        return Entry(
            path=f"{directory}/{name}",
            type=kind,
            size=0 if kind is EntryType.DIRECTORY else 3,
            owner="alice",
            mtime=1_700_000_000,
            backend_type=BackendType.LOCALFS,
            instance_id=None,
            created_at=1_700_000_000,
        )

    made = [one(f"f{i:05d}", EntryType.FILE) for i in range(files)]
    made += [one(f"d{i:05d}", EntryType.DIRECTORY) for i in range(dirs)]
    for i in range(0, len(made), 500):
        await asyncio.gather(*(node.meta.create(e) for e in made[i : i + 500]))


async def page(client: Client, url: str) -> tuple[dict[str, Any], Any]:
    resp = await client.get(url, headers=auth())
    assert resp.status == 200, await resp.text()
    return await resp.json(), resp.headers


async def walk(client: Client, base: str, limit: int, by_name: bool = False) -> list[list[str]]:
    """Every page of ``base``, following ``next`` (or the last name) until it is absent."""
    pages: list[list[str]] = []
    url = f"{base}?limit={limit}"
    while True:
        body, headers = await page(client, url)
        names = [i["name"] for i in body["items"]]
        assert body["count"] == len(names) == int(headers["X-CallFS-Count"]) <= limit
        assert list(body)[:5] == ["path", "type", "recursive", "count", "items"]
        pages.append(names)
        if "next" not in body:
            assert "X-CallFS-Next" not in headers
            return pages
        assert headers["X-CallFS-Next"] == body["next"]
        after = names[-1] if by_name else body["next"]
        url = f"{base}?limit={limit}&after={quote(after, safe='')}"
        assert len(pages) < 100


async def test_pages_follow_the_cursor_across_the_type_boundary(client: Client) -> None:
    whole = await mixed(client)
    for limit in (1, 2, 3, 6, 7, 9, 10, 11, 10000):
        for by_name in (False, True):
            pages = await walk(client, "/v1/directories/p", limit, by_name)
            assert [n for p in pages for n in p] == whole, (limit, by_name)
            assert all(len(p) == limit for p in pages[:-1])
            # a page ends exactly at the end: no "next", never an empty page after it
            assert len(pages) == max(1, -(-len(whole) // limit))


async def test_page_items_and_cursor_shape(client: Client) -> None:
    await mixed(client)
    full, _ = await page(client, "/v1/directories/p")
    body, headers = await page(client, "/v1/directories/p?limit=6")
    assert body["items"] == full["items"][:6]
    assert (body["path"], body["type"], body["recursive"]) == ("/p", "directory", False)
    assert headers["X-CallFS-Recursive"] == "false"
    cursor = body["next"]
    assert cursor.startswith("f/") and all(c.isalnum() or c in "-_/" for c in cursor)
    body, _ = await page(client, f"/v1/directories/p?limit=1&after={cursor}")
    assert [i["name"] for i in body["items"]] == ["A"]
    assert body["next"].startswith("d/")


async def test_after_a_plain_name(client: Client) -> None:
    await mixed(client)
    # an existing name stands for that child (a directory here: files are not repeated)
    body, _ = await page(client, "/v1/directories/p?limit=10&after=a")
    assert [i["name"] for i in body["items"]] == ["zz", "édir"]
    body, _ = await page(client, "/v1/directories/p?limit=2&after=zeta")
    assert [i["name"] for i in body["items"]] == ["é", "\uffff"]
    # a name no child has is a file position: the files past it, then every directory
    body, _ = await page(client, "/v1/directories/p?limit=10&after=b")
    assert [i["name"] for i in body["items"]] == ["zeta", "é", "\uffff", "\U0001f600", *DIRS]


async def test_empty_directory_and_past_the_end(client: Client) -> None:
    await make(client, "empty/", "one/x")
    body, headers = await page(client, "/v1/directories/empty?limit=5")
    assert body == {
        "path": "/empty",
        "type": "directory",
        "recursive": False,
        "count": 0,
        "items": [],
    }
    assert headers["X-CallFS-Count"] == "0"
    for after in ("x", "zzz", "d/enp6", "f/eA"):
        body, _ = await page(client, f"/v1/directories/one?limit=5&after={after}")
        assert body["items"] == [] and "next" not in body, after
    body, _ = await page(client, "/v1/directories/one?limit=1")
    assert [i["name"] for i in body["items"]] == ["x"] and "next" not in body


async def test_recursive_listings_are_not_paged(client: Client) -> None:
    await make(client, "r/a/b.txt")
    resp = await client.get("/v1/directories/r?recursive=true&limit=5", headers=auth())
    assert resp.status == 400
    assert (await resp.json())["code"] == "BAD_REQUEST"
    body, _ = await page(client, "/v1/directories/r?recursive=true&max_depth=0&limit=5")
    assert body["recursive"] is True and [i["name"] for i in body["items"]] == ["a"]


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=-1",
        "limit=abc",
        "limit=",
        "limit=%205",
        "limit=1.5",
        "limit=10001",
        "limit=99999999999999999999",
        "after=a",
        "limit=5&after=",
        "limit=5&after=..",
        "limit=5&after=x%00y",
        "limit=5&after=q/YQ",
        "limit=5&after=f/",
        "limit=5&after=f/YQ==",
        "limit=5&after=f/!!",
        "limit=5&after=f/_w",  # not UTF-8
        "limit=5&after=f/YS9i",  # "a/b": not a name
        "limit=5&after=a/b/c",
    ],
)
async def test_bad_limit_or_after(client: Client, query: str) -> None:
    await make(client, "d/x")
    for base in ("/v1/directories/d", "/v1/files/d", "/v1/files/d/"):
        resp = await client.get(f"{base}?{query}", headers=auth())
        assert resp.status == 400, (base, query)
        assert (await resp.json())["code"] == "BAD_REQUEST"
    # syntax comes before state: a missing directory still gets 400
    resp = await client.get(f"/v1/directories/missing?{query}", headers=auth())
    assert resp.status == 400


async def test_files_route_pages(client: Client) -> None:
    whole = await mixed(client)
    seen: list[str] = []
    url = "/v1/files/p/?limit=4"
    while True:
        resp = await client.get(url, headers=auth())
        assert resp.status == 200
        assert resp.headers["X-CallFS-Type"] == "directory"
        items = await resp.json()
        assert isinstance(items, list) and len(items) <= 4
        seen += [i["name"] for i in items]
        head = await client.head(url, headers=auth())
        assert head.headers["Content-Length"] == str(len(await resp.read()))
        assert head.headers.get("X-CallFS-Next") == resp.headers.get("X-CallFS-Next")
        if "X-CallFS-Next" not in resp.headers:
            break
        url = f"/v1/files/p?limit=4&after={resp.headers['X-CallFS-Next']}"
    assert seen == whole
    # a file ignores the listing parameters
    resp = await client.get("/v1/files/p/zeta?limit=oops", headers=auth())
    assert resp.status == 200 and await resp.read() == b"x"


def v1_body(path: str, entries: list[Entry]) -> bytes:
    items = [entry_json(e) for e in entries]
    body = {"path": path, "type": "directory", "recursive": False, "count": len(items)}
    return dumps({**body, "items": items}).encode()


async def test_large_listing_streams_the_v1_bytes(node: Node, client: Client) -> None:
    await make(client, "big/")
    await bulk(node, "/big", files=LISTING_PAGE + 700, dirs=LISTING_PAGE + 1)
    assert node.meta is not None
    everything = await node.meta.list_children("/big")
    assert len(everything) == 2 * LISTING_PAGE + 701

    resp = await client.get("/v1/directories/big", headers=auth())
    assert resp.status == 200
    assert resp.headers["X-CallFS-Count"] == str(len(everything))
    assert resp.headers["X-CallFS-Type"] == "directory"
    assert resp.headers["X-CallFS-Recursive"] == "false"
    assert resp.headers["Content-Type"] == "application/json"
    assert "Content-Length" not in resp.headers  # streamed, chunked
    assert await resp.read() == v1_body("/big", everything)

    resp = await client.get("/v1/files/big/", headers=auth())
    assert resp.status == 200 and "Content-Length" not in resp.headers
    raw = await resp.read()
    assert raw == dumps([entry_json(e) for e in everything]).encode()
    head = await client.head("/v1/files/big", headers=auth())
    assert head.headers["Content-Length"] == str(len(raw))
    assert head.headers["Content-Type"] == "application/json"

    # the pages of a large directory join up exactly too
    pages = await walk(client, "/v1/directories/big", 999)
    assert [n for p in pages for n in p] == [e.name for e in everything]


async def test_exactly_one_page_is_not_streamed(node: Node, client: Client) -> None:
    await make(client, "full/")
    await bulk(node, "/full", files=LISTING_PAGE - 1, dirs=1)
    resp = await client.get("/v1/directories/full", headers=auth())
    assert resp.headers["X-CallFS-Count"] == str(LISTING_PAGE)
    assert resp.headers["Content-Length"] == str(len(await resp.read()))


async def test_a_store_failure_midway_cuts_the_stream(
    node: Node, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    await make(client, "cut/")
    await bulk(node, "/cut", files=LISTING_PAGE * 3, dirs=0)
    assert node.engine is not None
    real = node.engine.directory_pages

    async def failing(directory: Entry, after: Any, size: int) -> AsyncGenerator[list[Entry], None]:
        pages = real(directory, after, size)
        yield await anext(pages)
        await pages.aclose()
        raise Unavailable("metadata store unavailable")

    monkeypatch.setattr(node.engine, "directory_pages", failing)
    resp = await client.get("/v1/directories/cut", headers=auth())
    assert resp.status == 200  # the status line was out before the failure
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()  # truncated, never a short well-formed listing
