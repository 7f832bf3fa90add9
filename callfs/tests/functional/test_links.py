"""Single-use links and rate limits (API.md §9.12, §9.13, §10, §15)."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from callfs.api.ratelimit import RateLimiter
from callfs.api.state import STATE
from callfs.daemon import Node
from callfs.links.service import LinkService, format_expiry
from callfs.tests.functional.conftest import BOB_KEY, auth

Client = TestClient[Any, Any]
RATE_LIMITED = b'{"code":"RATE_LIMIT_EXCEEDED","message":"Rate limit exceeded"}'


@pytest.fixture(autouse=True)
def relaxed_limits(node: Node, request: pytest.FixtureRequest) -> None:
    """Most tests here are about links, not limits: give them room unless they test limits."""
    if "limits" in request.node.name:
        return
    assert node.app is not None
    state = node.app[STATE]
    state.link_limiter = RateLimiter(1e6, 1000)
    state.download_limiter = RateLimiter(1e6, 1000)


async def make_link(client: Client, path: str = "/docs/report.pdf", expiry: int = 60) -> Any:
    resp = await client.post(
        "/v1/links/generate", json={"path": path, "expiry_seconds": expiry}, headers=auth()
    )
    return resp


async def test_generate_and_download_once(client: Client) -> None:
    await client.post("/v1/files/docs/report.pdf", data=b"%PDF-1.7 data", headers=auth())
    resp = await make_link(client)
    assert resp.status == 201
    raw = await resp.read()
    assert raw.endswith(b"}\n")
    body = await resp.json()
    assert list(body) == ["url", "token", "expires"]
    token = body["token"]
    assert len(token) == 69
    link_id, sig = token.split(".", 1)
    assert len(link_id) == 24 and link_id.endswith("==")
    assert len(sig) == 44 and sig.endswith("=")
    assert body["url"] == f"http://127.0.0.1:8443/download/{token}"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z", body["expires"])

    resp = await client.get(f"/download/{token}")
    assert resp.status == 200
    assert await resp.read() == b"%PDF-1.7 data"
    assert resp.headers["Content-Type"] == "application/octet-stream"
    assert (
        resp.headers["Content-Disposition"]
        == "attachment; filename=\"report.pdf\"; filename*=UTF-8''report.pdf"
    )
    assert resp.headers["Content-Length"] == "13"
    assert not [h for h in resp.headers if h.startswith("X-CallFS")]
    assert "Accept-Ranges" not in resp.headers

    resp = await client.get(f"/download/{token}")
    assert resp.status == 410
    assert (await resp.json())["code"] == "LINK_ALREADY_USED"


async def test_download_ignores_range_and_encodes_name(client: Client) -> None:
    await client.post("/v1/files/a b/ré sumé(1).txt", data=b"0123456789", headers=auth())
    token = (await (await make_link(client, "a b/ré sumé(1).txt")).json())["token"]
    resp = await client.get(f"/download/{token}", headers={"Range": "bytes=0-1"})
    assert resp.status == 200
    assert await resp.read() == b"0123456789"
    assert (
        resp.headers["Content-Disposition"] == 'attachment; filename="re sume(1).txt"; '
        "filename*=UTF-8''r%C3%A9%20sum%C3%A9%281%29.txt"
    )


async def test_concurrent_redeemers_exactly_one_wins(client: Client) -> None:
    await client.post("/v1/files/race.bin", data=b"r" * 100_000, headers=auth())
    token = (await (await make_link(client, "race.bin")).json())["token"]
    results = await asyncio.gather(*(client.get(f"/download/{token}") for _ in range(20)))
    statuses = sorted(r.status for r in results)
    assert statuses == [200] + [410] * 19
    for r in results:
        if r.status == 410:
            assert (await r.json())["code"] == "LINK_ALREADY_USED"


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"path": "/f.txt", "expiry_seconds": 0}, 400),
        ({"path": "/f.txt", "expiry_seconds": 86401}, 400),
        ({"path": "/f.txt", "expiry_seconds": "60"}, 400),
        ({"path": "/f.txt", "expiry_seconds": True}, 400),
        ({"path": "/f.txt", "expiry_seconds": 1.5}, 400),
        ({"path": "", "expiry_seconds": 60}, 400),
        ({"path": 3, "expiry_seconds": 60}, 400),
        ({"path": "../etc", "expiry_seconds": 60}, 400),
        ({"path": "/missing", "expiry_seconds": 60}, 404),
        ({"path": "/d", "expiry_seconds": 60}, 400),
        ({"path": "f.txt", "expiry_seconds": 86400, "extra": 1}, 201),
        ({"path": "/f.txt/", "expiry_seconds": 1}, 201),
    ],
)
async def test_generate_validation(client: Client, body: Any, status: int) -> None:
    await client.post("/v1/files/f.txt", data=b"x", headers=auth())
    await client.post("/v1/files/d/", headers=auth())
    resp = await client.post("/v1/links/generate", json=body, headers=auth())
    assert resp.status == status, await resp.text()


async def test_generate_body_caps(client: Client) -> None:
    await client.post("/v1/files/f.txt", data=b"x", headers=auth())
    big = b'{"path":"/f.txt","expiry_seconds":60,"pad":"' + b"x" * 5000 + b'"}'
    resp = await client.post("/v1/links/generate", data=big, headers=auth())
    assert resp.status == 400  # never 413 for the 4096-byte cap
    for raw in (b"not json", b"[]", b"", b"null"):
        resp = await client.post("/v1/links/generate", data=raw, headers=auth())
        assert resp.status == 400, raw
    assert (await client.post("/v1/links/generate", json={})).status == 401


async def test_links_to_other_users_files_and_directories(client: Client) -> None:
    await client.post("/v1/files/alice.txt", data=b"a", headers=auth())
    resp = await client.post(
        "/v1/links/generate",
        json={"path": "/alice.txt", "expiry_seconds": 5},
        headers=auth(BOB_KEY),
    )
    assert resp.status == 201  # anyone may read an existing file


async def test_unknown_forged_expired_and_swept(client: Client, node: Node) -> None:
    await client.post("/v1/files/f.txt", data=b"x", headers=auth())
    assert (await client.get("/download/nope")).status == 404
    body = await (await make_link(client, "f.txt")).json()
    token = body["token"]
    forged = token[:-5] + ("AAAA=" if not token.endswith("AAAA=") else "BBBB=")
    resp = await client.get(f"/download/{forged}")
    assert resp.status == 404
    assert (await resp.json())["code"] == "LINK_NOT_FOUND"
    assert (await client.get(f"/download/{token[:30]}")).status == 404

    assert node.app is not None
    state = node.app[STATE]
    # A link whose secret has changed since it was issued is refused as expired.
    rotated = LinkService(node.meta, "another-secret-entirely-0000")
    stale = await client.post(
        "/v1/links/generate", json={"path": "/f.txt", "expiry_seconds": 60}, headers=auth()
    )
    stale_token = (await stale.json())["token"]
    original = state.links
    state.links = rotated
    try:
        resp = await client.get(f"/download/{stale_token}")
        assert resp.status == 410
        assert (await resp.json())["code"] == "LINK_EXPIRED"
    finally:
        state.links = original

    # Expiry: a link generated with a clock in the past is expired now.
    past = LinkService(node.meta, "link-secret-0123456789abcdef", clock_ns=lambda: 1_000_000_000)
    old, _ = await past.generate("/f.txt", 1)
    resp = await client.get(f"/download/{old.token}")
    assert resp.status == 410
    assert (await resp.json())["code"] == "LINK_EXPIRED"
    assert await state.links.sweep() >= 1
    assert (await client.get(f"/download/{old.token}")).status == 404


async def test_deleted_file_burns_the_link(client: Client) -> None:
    await client.post("/v1/files/gone.txt", data=b"x", headers=auth())
    token = (await (await make_link(client, "gone.txt")).json())["token"]
    await client.delete("/v1/files/gone.txt", headers=auth())
    resp = await client.get(f"/download/{token}")
    assert resp.status == 404
    assert (await resp.json())["code"] == "FILE_NOT_FOUND"
    assert (await client.get(f"/download/{token}")).status == 410


async def test_rate_limits_generate(client: Client) -> None:
    await client.post("/v1/files/f.txt", data=b"x", headers=auth())
    first = await make_link(client, "f.txt")
    second = await make_link(client, "f.txt")
    assert first.status == 201
    assert second.status == 429
    assert await second.read() == RATE_LIMITED
    assert "Retry-After" not in second.headers
    assert not [h for h in second.headers if h.lower().startswith("x-ratelimit")]
    # authentication comes before the limit
    assert (await client.post("/v1/links/generate", json={})).status == 401


async def test_rate_limits_download(client: Client) -> None:
    statuses = [(await client.get("/download/unknown-token")).status for _ in range(8)]
    assert statuses[:5] == [404] * 5
    assert 429 in statuses[5:]


def test_bucket_refills_and_memory_is_bounded() -> None:
    now = [0.0]
    limiter = RateLimiter(10.0, 5, max_tracked=100, clock=lambda: now[0])
    assert [limiter.allow("a") for _ in range(6)] == [True] * 5 + [False]
    now[0] += 0.1
    assert limiter.allow("a") is True
    assert limiter.allow("a") is False
    for i in range(500):
        limiter.allow(f"10.0.{i // 256}.{i % 256}")
    assert len(limiter) == 100
    now[0] += 601
    limiter.allow("b")
    assert len(limiter) == 1


def test_expiry_format() -> None:
    assert format_expiry(1_767_323_045_000_000_000) == "2026-01-02T03:04:05Z"
    assert format_expiry(1_767_323_045_123_400_000) == "2026-01-02T03:04:05.1234Z"
