"""The request pipeline (API.md §3, §4, §8): ids, security headers, authentication, errors."""

from __future__ import annotations

import re
from typing import Any

from aiohttp.test_utils import TestClient

from callfs.api.middleware import SECURITY_HEADERS
from callfs.tests.functional.conftest import ALICE_KEY, INTERNAL, KEY0, auth, raw_url

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


async def test_a_refused_method_is_counted_under_its_route(client: TestClient[Any, Any]) -> None:
    """§16: ``path`` is the route template, ``unmatched`` only where no route matches. A 405
    on a known route was labelled ``unmatched`` (aiohttp's answer names no resource); found by
    the metrics audit."""
    assert (await client.post("/download/x")).status == 405
    assert (await client.get("/v1/links/generate", headers=auth())).status == 405
    assert (await client.get("/no/such/route", headers=auth())).status == 404
    text = await (await client.get("/metrics", headers=auth())).text()
    for line in (
        'callfs_http_requests_total{method="POST",path="/download/{token}",status_code="405"}',
        'callfs_http_requests_total{method="GET",path="/v1/links/generate",status_code="405"}',
        'callfs_http_requests_total{method="GET",path="unmatched",status_code="404"}',
    ):
        assert line in text, line
    assert 'path="unmatched",status_code="405"' not in text


async def test_error_bodies_are_compact_json(client: TestClient[Any, Any]) -> None:
    resp = await client.get("/v1/files/missing.txt", headers=auth())
    assert resp.status == 404
    raw = await resp.read()
    assert raw == b'{"code":"FILE_NOT_FOUND","message":"file not found"}'
    assert resp.headers["Content-Type"] == "application/json"


async def test_a_route_prefix_spelled_with_escapes_is_the_same_route(
    client: TestClient[Any, Any],
) -> None:
    """The router compares decoded paths (``/%6Detrics`` is ``/metrics``, as URIs compare), so
    authentication (§3 step 4) and the path after the route prefix (§6.1) must read the path the
    same way. ``/%6Detrics`` served the metrics without credentials, ``/%761/files/x`` was a 500
    (no identity), and POST ``/v1/%66iles/x`` created ``/es/x`` (the prefix was cut by length)."""
    for raw in ("/%6Detrics", "/%761/status", "/%761/files/x", "/%761/directories/"):
        resp = await client.session.get(raw_url(client, raw))
        assert resp.status == 401, raw
        assert await resp.read() == AUTH_FAILED
        assert_common_headers(resp)
    resp = await client.session.get(raw_url(client, "/%6Detrics"), headers=auth())
    assert resp.status == 200 and "callfs_http_requests_total" in await resp.text()
    resp = await client.session.get(raw_url(client, "/%761/files/x"), headers=auth())
    assert resp.status == 404
    assert (await resp.json())["code"] == "FILE_NOT_FOUND"
    url = raw_url(client, "/v1/%66iles/zzqq")
    assert (await client.session.post(url, data=b"body1")).status == 401
    assert (await client.session.post(url, data=b"body1", headers=auth())).status == 201
    assert await (await client.get("/v1/files/zzqq", headers=auth())).read() == b"body1"
    resp = await client.session.get(raw_url(client, "/%76%31/%64irectories"), headers=auth())
    assert [i["path"] for i in (await resp.json())["items"]] == ["/zzqq"]
    resp = await client.session.post(raw_url(client, "/v1/%69nternal/raft/join"), headers=auth())
    assert resp.status == 404  # no Raft here: no such internal route, with any spelling


async def test_an_escaped_ws_is_the_websocket_route_for_get_only(
    client: TestClient[Any, Any],
) -> None:
    """§6.2: ``GET /v1/files/ws/...`` is the WebSocket endpoint (``%77s`` is ``ws``); other
    methods there reach the file handlers, with the path after ``/v1/files/``."""
    resp = await client.session.get(raw_url(client, "/v1/files/%77s/x"), headers=auth())
    assert resp.status == 400
    assert (await resp.json())["message"] == "not a WebSocket request"
    url = raw_url(client, "/v1/files/%77s/y")
    assert (await client.session.put(url, data=b"in ws", headers=auth())).status == 201
    resp = await client.head("/v1/files/ws/y", headers=auth())
    assert resp.status == 200 and resp.headers["X-CallFS-Size"] == "5"


async def test_an_unknown_internal_route_is_the_json_404(client: TestClient[Any, Any]) -> None:
    """Only the internal endpoints skip the pipeline (§3); a path under ``/v1/internal/`` that
    names none is an unknown route: the JSON 404 with the security headers."""
    for raw in ("/v1/internal/nope", "/v1/internal/raft/join", "/v1/internal/shards/k/1"):
        resp = await client.get(raw)
        assert resp.status == 404, raw
        assert await resp.read() == b'{"code":"NOT_FOUND","message":"not found"}'
        assert_common_headers(resp)


async def test_a_file_request_on_the_root_spelled_a_dotdot(client: TestClient[Any, Any]) -> None:
    """``a/..`` is the root in file form (§6.1): a POST of a file there is the 409 of a file
    onto a directory, never the idempotent directory create."""
    resp = await client.session.post(raw_url(client, "/v1/files/a/.."), data=b"hi", headers=auth())
    assert resp.status == 409, await resp.text()
    assert (await resp.json())["message"] == "path exists as directory, cannot create file"
    resp = await client.session.put(raw_url(client, "/v1/files/a/.."), data=b"hi", headers=auth())
    assert resp.status == 400
    resp = await client.session.post(raw_url(client, "/v1/files/a/../"), headers=auth())
    assert resp.status == 200


async def test_a_client_that_hangs_up_is_no_server_error(
    client: TestClient[Any, Any], caplog: Any
) -> None:
    """Found by review: an upload the client abandoned mid-body counted as a 500 (in
    ``callfs_http_requests_total`` and ``callfs_errors_total``, so the docs' 5xx alert fired on
    ordinary aborts) and logged an ERROR traceback. It is recorded as 499, nginx's "client closed
    request", and nothing is stored."""
    import asyncio
    import logging

    caplog.set_level(logging.INFO)
    server = client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(
        f"PUT /v1/files/abandoned.bin HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY0}\r\n"
        f"Content-Length: {64 << 20}\r\n\r\n".encode()
        + b"x" * (1 << 20)
    )
    await writer.drain()
    await asyncio.sleep(0.3)
    writer.transport.abort()  # gone, without a FIN's grace
    for _ in range(100):
        text = await (await client.get("/metrics", headers=auth())).text()
        if 'method="PUT"' in text:
            break
        await asyncio.sleep(0.05)
    puts = [
        ln for ln in text.splitlines() if ln.startswith('callfs_http_requests_total{method="PUT"')
    ]
    assert len(puts) == 1 and 'status_code="499"' in puts[0], puts
    assert 'callfs_errors_total{component="http"' not in text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.records
    # its access-log line still names the client (the transport, gone, had taken its address)
    (line,) = [r for r in caplog.records if getattr(r, "status", None) == 499]
    assert line.remote_addr == "127.0.0.1", line.__dict__  # type: ignore[attr-defined]
    assert (await client.get("/v1/files/abandoned.bin", headers=auth())).status == 404
    del reader
