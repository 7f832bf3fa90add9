"""A request relayed to the owner node carries the path exactly as the client wrote it: the owner
canonicalises it as this node did (API.md §6.1, §12.3). A URL library that re-parses it on the way
(dot segments resolved by RFC 3986's rules, ``%2E`` decoded) sent PUT ``/v1/files/a//../b`` to
the owner as ``/v1/files/a/b``: this node decided on ``/b``, the owner wrote ``/a/b``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from callfs.daemon import Node
from callfs.model import BackendType, Entry, EntryType
from callfs.tests.functional.conftest import auth, raw_url


@pytest.fixture
async def owner() -> AsyncIterator[tuple[int, list[str]]]:
    """Node b, started first (``config_env`` names its port): records the raw path of every
    request it gets, answers 200."""
    seen: list[str] = []

    async def record(request: web.Request) -> web.StreamResponse:
        seen.append(request.rel_url.raw_path)
        await request.read()
        return web.Response(status=200)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    server = TestServer(app, port=0)
    await server.start_server()
    try:
        yield server.port, seen
    finally:
        await server.close()


@pytest.fixture
def config_env(owner: tuple[int, list[str]]) -> dict[str, str]:
    return {
        "CALLFS_INSTANCE_DISCOVERY__INSTANCE_ID": "a",
        "CALLFS_INSTANCE_DISCOVERY__PEER_ENDPOINTS__B": f"http://127.0.0.1:{owner[0]}",
    }


@pytest.mark.parametrize("raw", ["/v1/files/a//../b", "/v1/files/a/%2E%2E/b", "/v1/files/x/./../b"])
async def test_a_relayed_request_keeps_the_path_as_written(
    client: TestClient[Any, Any], node: Node, owner: tuple[int, list[str]], raw: str
) -> None:
    engine = node.engine
    assert engine is not None
    theirs = Entry(
        path="/b",
        type=EntryType.FILE,
        size=1,
        owner="alice",
        mtime=0,
        backend_type=BackendType.LOCALFS,
        instance_id="b",
        created_at=0,
        blob_key="0123456789abcdef0123456789abcdef",
    )
    await engine._meta.create(replace(theirs))
    resp = await client.session.put(raw_url(client, raw), data=b"new", headers=auth())
    assert resp.status == 200, await resp.text()
    assert owner[1] == [raw]
