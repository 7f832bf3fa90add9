"""The request pipeline (API.md §3, §4, §8): ids, security headers, authentication, errors."""

from __future__ import annotations

import re
from typing import Any

from aiohttp.test_utils import TestClient

from callfs.api.middleware import SECURITY_HEADERS
from callfs.tests.functional.conftest import ALICE_KEY, INTERNAL, KEY0, auth

AUTH_FAILED = b'{"code":"AUTHENTICATION_FAILED","message":"authentication failed"}'


def assert_common_headers(resp: Any) -> None:
    for name, value in SECURITY_HEADERS.items():
        assert resp.headers[name] == value, name
    assert re.fullmatch(r"[0-9a-f]{16}", resp.headers["X-Request-ID"])
    assert "Strict-Transport-Security" not in resp.headers  # plain HTTP


async def test_health(client: TestClient[Any, Any]) -> None:
    resp = await client.get("/health")
    assert resp.status == 200
    assert await resp.read() == b'{"status":"ok"}'
    assert resp.headers["Content-Type"] == "application/json"
    assert_common_headers(resp)


async def test_request_id_is_fresh_and_never_taken_from_the_request(
    client: TestClient[Any, Any],
) -> None:
    seen = set()
    for _ in range(5):
        resp = await client.get("/health", headers={"X-Request-ID": "0123456789abcdef"})
        seen.add(resp.headers["X-Request-ID"])
    assert len(seen) == 5
    assert "0123456789abcdef" not in seen


async def test_head_is_405_outside_files(client: TestClient[Any, Any]) -> None:
    resp = await client.head("/health")
    assert resp.status == 405
    assert "GET" in resp.headers["Allow"]
    assert_common_headers(resp)


async def test_unknown_route_without_credentials_is_401_with_them_404(
    client: TestClient[Any, Any],
) -> None:
    resp = await client.get("/v1/nope")
    assert resp.status == 401
    assert await resp.read() == AUTH_FAILED
    assert_common_headers(resp)
    resp = await client.get("/v1/nope", headers=auth())
    assert resp.status == 404
    assert await resp.read() == b'{"code":"NOT_FOUND","message":"not found"}'
    resp = await client.get("/elsewhere")
    assert resp.status == 404
    assert (await resp.json())["code"] == "NOT_FOUND"


async def test_wrong_method_is_json_405_with_allow(client: TestClient[Any, Any]) -> None:
    resp = await client.post("/v1/directories/x", headers=auth())
    assert resp.status == 405
    body = await resp.json()
    assert body["code"] == "METHOD_NOT_ALLOWED"
    assert "GET" in resp.headers["Allow"]
    assert_common_headers(resp)


async def test_token_forms(client: TestClient[Any, Any]) -> None:
    ok = [f"Bearer {ALICE_KEY}", ALICE_KEY, f"Bearer   {ALICE_KEY}  ", INTERNAL, KEY0]
    for header in ok:
        resp = await client.get("/v1/files/", headers={"Authorization": header})
        assert resp.status == 200, header
    bad = ["", "Bearer ", f"bearer {ALICE_KEY}", ALICE_KEY[:-1], ALICE_KEY + "x", "Basic abc"]
    for header in bad:
        resp = await client.get("/v1/files/", headers={"Authorization": header})
        assert resp.status == 401, header
        assert await resp.read() == AUTH_FAILED
    resp = await client.get("/v1/files/")
    assert resp.status == 401


async def test_metrics_needs_auth_on_main_port(client: TestClient[Any, Any]) -> None:
    assert (await client.get("/metrics")).status == 401
    await client.get("/health")
    resp = await client.get("/metrics", headers=auth())
    assert resp.status == 200
    text = await resp.text()
    assert 'callfs_http_requests_total{method="GET",path="/health",status_code="200"}' in text
    assert "callfs_metadata_db_queries_total" in text


async def test_error_bodies_are_compact_json(client: TestClient[Any, Any]) -> None:
    resp = await client.get("/v1/files/missing.txt", headers=auth())
    assert resp.status == 404
    raw = await resp.read()
    assert raw == b'{"code":"FILE_NOT_FOUND","message":"file not found"}'
    assert resp.headers["Content-Type"] == "application/json"
