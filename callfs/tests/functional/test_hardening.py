"""Clear answers instead of 500 (issue 10): odd bytes in headers, paths the OS could not hold, a
full disk, requests aiohttp's parser refuses, ``Expect: 100-continue`` and odd digits."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from callfs.api.middleware import SECURITY_HEADERS
from callfs.daemon import Node
from callfs.storage import localfs
from callfs.tests.functional.conftest import ALICE_KEY, auth, raw_url, unreferenced_files

Client = TestClient[Any, Any]


# ---- raw HTTP/1.1 over a socket ---------------------------------------------------------------
@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes
    raw: bytes


def _parse(raw: bytes) -> RawResponse:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return RawResponse(status, headers, body, raw)


async def _open(client: Client) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(client.server.host, client.server.port)


async def _read_response(reader: asyncio.StreamReader) -> RawResponse:
    """One final response (1xx interim responses included in ``raw``, not skipped)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    parsed = _parse(head)
    length = int(parsed.headers.get("content-length", "0"))
    body = await asyncio.wait_for(reader.readexactly(length), 5) if length else b""
    return RawResponse(parsed.status, parsed.headers, body, head + body)


async def raw_exchange(client: Client, data: bytes) -> RawResponse:
    reader, writer = await _open(client)
    try:
        writer.write(data)
        await writer.drain()
        return await _read_response(reader)
    finally:
        writer.close()


async def request_raw(client: Client, method: str, raw_path: str, **kwargs: Any) -> Any:
    """A request whose path is sent exactly as written; the body is read before returning."""
    resp = await client.session.request(method, raw_url(client, raw_path), **kwargs)
    await resp.read()  # kept: read(), text() and json() answer from it
    return resp


async def chunks_of(data: bytes, size: int = 256 * 1024) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def assert_envelope(resp: RawResponse, status: int, code: str) -> dict[str, Any]:
    assert resp.status == status, resp.raw[:300]
    assert resp.headers["content-type"].startswith("application/json"), resp.raw[:300]
    body = json.loads(resp.body)
    assert body["code"] == code
    assert set(body) == {"code", "message"}
    for name, value in SECURITY_HEADERS.items():
        assert resp.headers[name.lower()] == value, name
    assert re.fullmatch(r"[0-9a-f]{16}", resp.headers["x-request-id"])
    return body  # type: ignore[no-any-return]


# ---- 1. a non-ASCII Authorization header -------------------------------------------------------
@pytest.mark.parametrize(
    "token",
    [b"Bearer caf\xe9", b"Bearer " + ALICE_KEY.encode() + b"\xe9", b"\xff\xfe", b"Bearer \xc3\xa9"],
)
async def test_non_ascii_authorization_is_401(client: Client, token: bytes) -> None:
    resp = await raw_exchange(
        client,
        b"GET /v1/files/ HTTP/1.1\r\nHost: x\r\nAuthorization: " + token + b"\r\n\r\n",
    )
    body = assert_envelope(resp, 401, "AUTHENTICATION_FAILED")
    assert body["message"] == "authentication failed"


# ---- 2. a legal path the OS could not hold ----------------------------------------------------
def _deep_path(total: int = 4096) -> str:
    """``/aaa…/bbb…/…``: names of 255 bytes, the whole engine path exactly ``total`` bytes."""
    names: list[str] = []
    while total - 256 * len(names) > 256:
        names.append(chr(ord("a") + len(names)) * 255)
    names.append("z" * (total - 256 * len(names) - 1))
    path = "/" + "/".join(names)
    assert len(path.encode()) == total
    return path


def _disk_entries(node: Node) -> list[str]:
    """Everything under the localfs root outside the internal ``.callfs`` area."""
    root = Path(node.cfg.backend.localfs_root_path)
    return sorted(str(p.relative_to(root)) for p in root.iterdir() if p.name != ".callfs")


async def test_deepest_legal_path_round_trips_without_disk_directories(
    client: Client, node: Node
) -> None:
    """Blobs live under ``.callfs/blobs/<key>``: a 4096-byte path with 255-byte names (which no
    OS path could hold under the root) is metadata only: created, read, listed, moved, deleted."""
    deep = _deep_path()
    resp = await request_raw(client, "PUT", "/v1/files" + deep, data=b"deep", headers=auth())
    assert resp.status == 201, await resp.text()
    resp = await request_raw(client, "GET", "/v1/files" + deep, headers=auth())
    assert resp.status == 200
    assert await resp.read() == b"deep"
    parent = deep.rsplit("/", 1)[0]
    resp = await request_raw(client, "GET", "/v1/directories" + parent, headers=auth())
    assert resp.status == 200
    assert [i["path"] for i in (await resp.json())["items"]] == [deep]
    # a directory at the limit, and a move to a deep destination with create_parents
    resp = await request_raw(client, "POST", "/v1/files" + _deep_path(4095) + "/", headers=auth())
    assert resp.status == 201, await resp.text()
    moved = "/z" + deep[2:]
    resp = await request_raw(
        client,
        "PATCH",
        "/v1/files" + deep,
        json={"destination": moved, "create_parents": True},
        headers=auth(),
    )
    assert resp.status == 200, await resp.text()
    resp = await request_raw(client, "GET", "/v1/files" + moved, headers=auth())
    assert await resp.read() == b"deep"
    assert _disk_entries(node) == []
    top = moved.split("/")[1]
    resp = await request_raw(client, "DELETE", f"/v1/files/{top}?recursive=true", headers=auth())
    assert resp.status == 204


async def test_over_the_limit_path_is_400_naming_the_limit(client: Client, node: Node) -> None:
    for path in ("/" + "n" * 256, _deep_path(4095) + "/x"):
        resp = await request_raw(client, "PUT", "/v1/files" + path, data=b"x", headers=auth())
        assert resp.status == 400
        body = await resp.json()
        assert body["code"] == "BAD_REQUEST"
        assert "255" in body["message"] or "4096" in body["message"], body
    resp = await client.get("/v1/directories/", headers=auth())
    assert (await resp.json())["items"] == []
    assert _disk_entries(node) == []


# ---- 3. data disk full ------------------------------------------------------------------------
def _try_mount_tmpfs(where: Path, size: str) -> bool:
    if os.geteuid() != 0:
        return False
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        check=False,
    )
    return done.returncode == 0


@pytest.fixture
def small_data_root(tmp_path: Path, config_env: dict[str, str]) -> Iterator[Path]:
    """A 1 MiB tmpfs as the localfs root (needs root; skipped otherwise, see the ENOSPC
    injection test below for the same path without a real full disk)."""
    root = tmp_path / "small"
    if not _try_mount_tmpfs(root, "1m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    config_env["CALLFS_BACKEND__LOCALFS_ROOT_PATH"] = str(root)
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)


async def _assert_nothing_visible(client: Client, node: Node, path: str) -> None:
    resp = await client.get(f"/v1/files/{path}", headers=auth())
    assert resp.status == 404
    assert await unreferenced_files(node) == []


async def test_full_disk_is_507_and_nothing_becomes_visible(
    small_data_root: Path, client: Client, node: Node
) -> None:
    resp = await client.put("/v1/files/fits.bin", data=b"f" * 100_000, headers=auth())
    assert resp.status == 201
    resp = await client.put("/v1/files/big.bin", data=chunks_of(b"x" * 2_000_000), headers=auth())
    assert resp.status == 507, await resp.text()
    assert await resp.json() == {
        "code": "INSUFFICIENT_STORAGE",
        "message": "insufficient storage",
    }
    await _assert_nothing_visible(client, node, "big.bin")
    # a replace that does not fit keeps the old version whole
    resp = await client.put("/v1/files/fits.bin", data=chunks_of(b"y" * 2_000_000), headers=auth())
    assert resp.status == 507
    resp = await client.get("/v1/files/fits.bin", headers=auth())
    assert await resp.read() == b"f" * 100_000
    # and once there is room again, the same request succeeds
    resp = await client.put("/v1/files/big.bin", data=b"x" * 500_000, headers=auth())
    assert resp.status == 201


class _FailingWrites:
    """A localfs write step that fails with ``OSError(err)`` once."""

    def __init__(self, err: int) -> None:
        self.err = err
        self.fired = 0

    def fail(self, *args: Any, **kwargs: Any) -> Any:
        self.fired += 1
        raise OSError(self.err, os.strerror(self.err))


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EDQUOT])
@pytest.mark.parametrize("step", ["a write while streaming", "the last write", "the publish"])
async def test_no_space_at_any_write_step_is_507(
    client: Client, node: Node, monkeypatch: pytest.MonkeyPatch, err: int, step: str
) -> None:
    assert node.engine is not None
    backend = node.engine.backend("localfs").inner  # type: ignore[attr-defined]
    fault = _FailingWrites(err)
    if step == "the publish":
        monkeypatch.setattr(backend, "_publish_blocking", fault.fail)
    else:
        # The disk fills up once some bytes are staged (a first write that fails is the tmpfs
        # test's case). A small body's only write is made by ``publish``, in its hop.
        real, calls = localfs._write_parts, []

        def write_then_fail(fd: int, parts: Any) -> None:
            calls.append(fd)
            if len(calls) == (2 if step == "a write while streaming" else 1):
                fault.fail()
            real(fd, parts)

        monkeypatch.setattr(localfs, "_write_parts", write_then_fail)
    # more than one write batch; a small body is written whole at publish
    data = b"z" * ((3 << 20) if step == "a write while streaming" else 100_000)
    resp = await client.post("/v1/files/nospace.bin", data=chunks_of(data), headers=auth())
    assert fault.fired == 1
    assert resp.status == 507, await resp.text()
    assert (await resp.json())["code"] == "INSUFFICIENT_STORAGE"
    await _assert_nothing_visible(client, node, "nospace.bin")
    monkeypatch.undo()
    resp = await client.post("/v1/files/nospace.bin", data=chunks_of(data), headers=auth())
    assert resp.status == 201


# ---- 4. requests aiohttp's parser refuses ------------------------------------------------------
PARSER_ERRORS = {
    "long-url": b"GET /v1/files/" + b"u" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "long-header": b"GET /health HTTP/1.1\r\nHost: x\r\nX-Secretish: " + b"h" * 9000 + b"\r\n\r\n",
    "nul-header": b"GET /health HTTP/1.1\r\nHost: x\r\nX-Nul: ab\x00cd-echo\r\n\r\n",
    "bad-request-line": b"GET /health HTTP/1.1 junk-echo\r\nHost: x\r\n\r\n",
    "bad-chunked-size": (
        b"PUT /v1/files/chunky HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + ALICE_KEY.encode()
        + b"\r\nTransfer-Encoding: chunked\r\n\r\nzz-echo\r\nabc\r\n0\r\n\r\n"
    ),
    "te-and-length": (
        b"PUT /v1/files/chunky HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    ),
}


@pytest.mark.parametrize("case", sorted(PARSER_ERRORS))
async def test_parser_errors_get_the_json_envelope(client: Client, node: Node, case: str) -> None:
    resp = await raw_exchange(client, PARSER_ERRORS[case])
    body = assert_envelope(resp, 400, "BAD_REQUEST")
    for echoed in (b"uuuu", b"hhhh", b"echo", b"Secretish", b"X-Nul"):
        assert echoed not in resp.raw
    assert body["message"]
    resp2 = await client.get("/v1/files/chunky", headers=auth())
    assert resp2.status == 404  # nothing half-written


# ---- 5. Expect: 100-continue ---------------------------------------------------------------------
def _put_expecting(path: str, length: int, key: str | None) -> bytes:
    lines = [
        f"PUT /v1/files/{path} HTTP/1.1",
        "Host: x",
        f"Content-Length: {length}",
        "Expect: 100-continue",
    ]
    if key is not None:
        lines.append(f"Authorization: Bearer {key}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.fixture
def small_uploads(config_env: dict[str, str]) -> None:
    config_env["CALLFS_SERVER__MAX_UPLOAD_SIZE"] = "1000"


@pytest.mark.parametrize(
    ("key", "length", "status", "code"),
    [
        (None, 10, 401, "AUTHENTICATION_FAILED"),
        ("wrong-key", 10, 401, "AUTHENTICATION_FAILED"),
        (ALICE_KEY, 5000, 413, "PAYLOAD_TOO_LARGE"),
    ],
)
async def test_expect_continue_is_refused_before_the_interim_response(
    small_uploads: None, client: Client, key: str | None, length: int, status: int, code: str
) -> None:
    resp = await raw_exchange(client, _put_expecting("exp.bin", length, key))
    assert not resp.raw.startswith(b"HTTP/1.1 100"), resp.raw[:100]
    assert_envelope(resp, status, code)
    assert resp.headers.get("connection", "").lower() == "close"  # the body was never read


async def test_expect_continue_is_refused_after_authorization(
    small_uploads: None, client: Client
) -> None:
    resp = await client.put("/v1/files/alice.bin", data=b"mine", headers=auth())
    assert resp.status == 201
    bob = "bob-key-0123456789abcdef000"
    resp2 = await raw_exchange(client, _put_expecting("alice.bin", 4, bob))
    assert not resp2.raw.startswith(b"HTTP/1.1 100")
    assert_envelope(resp2, 403, "PERMISSION_DENIED")


async def test_expect_continue_on_link_generation(client: Client) -> None:
    body = b'{"path":"/nothing"}'
    head = (
        "POST /v1/links/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n"
    ).encode()
    resp = await raw_exchange(client, head + b"\r\n")
    assert not resp.raw.startswith(b"HTTP/1.1 100")
    assert_envelope(resp, 401, "AUTHENTICATION_FAILED")
    reader, writer = await _open(client)
    try:
        writer.write(head + f"Authorization: Bearer {ALICE_KEY}\r\n\r\n".encode())
        await writer.drain()
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(body)
        await writer.drain()
        final = await _read_response(reader)
        assert final.status == 404  # the body was read and decided on
    finally:
        writer.close()


async def test_expect_continue_accepted_upload(small_uploads: None, client: Client) -> None:
    reader, writer = await _open(client)
    try:
        writer.write(_put_expecting("ok.bin", 5, ALICE_KEY))
        await writer.drain()
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"hello")
        await writer.drain()
        final = await _read_response(reader)
        assert final.status == 201
    finally:
        writer.close()
    resp = await client.get("/v1/files/ok.bin", headers=auth())
    assert await resp.read() == b"hello"


# ---- 6. control characters in paths, odd digits in Range ---------------------------------------
@pytest.mark.parametrize(
    "raw",
    ["a%0ab", "a%0Ab", "a%0d%0aX-Injected:%20yes", "%0a", "a%01b", "a%1fb"],
)
async def test_encoded_control_characters_in_a_path_are_400(client: Client, raw: str) -> None:
    for method in ("PUT", "GET", "POST"):
        resp = await request_raw(client, method, "/v1/files/" + raw, data=b"x", headers=auth())
        assert resp.status == 400, (method, raw, await resp.text())
        assert (await resp.json())["code"] == "BAD_REQUEST"
        assert "X-Injected" not in resp.headers


@pytest.mark.parametrize(
    "header",
    [
        "bytes=\u0660-\u0663",  # Arabic-Indic 0-3
        "bytes=\uff10-\uff13",  # fullwidth 0-3
        "bytes=-\uff12",
        "bytes=\u0661-",
        "bytes=1-\u0969",  # Devanagari 3
    ],
)
async def test_non_ascii_digits_in_range_are_ignored(client: Client, header: str) -> None:
    resp = await client.put("/v1/files/r.bin", data=b"0123456789", headers=auth())
    assert resp.status == 201
    reader, writer = await _open(client)
    try:
        writer.write(
            b"GET /v1/files/r.bin HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + ALICE_KEY.encode()
            + b"\r\nRange: "
            + header.encode()
            + b"\r\n\r\n"
        )
        await writer.drain()
        got = await _read_response(reader)
    finally:
        writer.close()
    assert got.status == 200, got.raw[:300]
    assert got.body == b"0123456789"
    assert "content-range" not in got.headers
