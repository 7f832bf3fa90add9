"""Resumable uploads, tus 1.0.0 at ``/v1/uploads/`` (docs/uploads.md): the protocol, durable
staging (a client gone mid-PATCH, a server restart), checksums, offsets, termination, expiry,
permissions, and a real tus client (tuspy)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import itertools
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from callfs.core import uploads as uploads_module
from callfs.daemon import Node
from callfs.errors import PermissionDenied, Unavailable
from callfs.model import Identity
from callfs.tests.functional.conftest import ALICE_KEY, BOB_KEY, INTERNAL, auth, make_config

Client = TestClient[Any, Any]
TUS = {"Tus-Resumable": "1.0.0"}
OCTET = {"Content-Type": "application/offset+octet-stream"}


def meta(**values: str) -> str:
    return ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in values.items())


def h(key: str = ALICE_KEY, **extra: str) -> dict[str, str]:
    return {**auth(key), **TUS, **extra}


async def create(client: Client, path: str, length: int, key: str = ALICE_KEY) -> str:
    r = await client.post(
        "/v1/uploads",
        headers=h(key, **{"Upload-Length": str(length), "Upload-Metadata": meta(path=path)}),
    )
    assert r.status == 201, await r.text()
    assert r.headers["Tus-Resumable"] == "1.0.0"
    assert ("Upload-Expires" in r.headers) == (length > 0)  # an empty upload is done at once
    location = r.headers["Location"]
    assert location.startswith("/v1/uploads/")
    return location


async def offset_of(client: Client, url: str, key: str = ALICE_KEY) -> int:
    r = await client.head(url, headers=h(key))
    assert r.status == 200
    assert r.headers["Cache-Control"] == "no-store"
    return int(r.headers["Upload-Offset"])


async def patch(client: Client, url: str, offset: int, body: bytes, **extra: str) -> Any:
    return await client.patch(
        url, data=io.BytesIO(body), headers=h(**OCTET, **{"Upload-Offset": str(offset)}, **extra)
    )


def checksum(algorithm: str, body: bytes) -> str:
    digest = hashlib.new(algorithm, body).digest()
    return f"{algorithm} {base64.b64encode(digest).decode()}"


def staged_dirs(node: Node) -> list[Path]:
    root = Path(node.cfg.backend.localfs_root_path) / ".callfs" / "uploads"
    return sorted(p for p in root.iterdir()) if root.exists() else []


async def test_options_advertises_the_extensions(client: Client) -> None:
    r = await client.options("/v1/uploads", headers=auth())
    assert r.status == 204
    assert r.headers["Tus-Resumable"] == "1.0.0"
    assert r.headers["Tus-Version"] == "1.0.0"
    extensions = set(r.headers["Tus-Extension"].split(","))
    assert {"creation", "termination", "checksum", "expiration"} <= extensions
    assert r.headers["Tus-Max-Size"] == str(10737418240)
    assert set(r.headers["Tus-Checksum-Algorithm"].split(",")) == {"sha1", "sha256", "md5"}


async def test_upload_in_chunks_commits_like_put(client: Client, node: Node) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    url = await create(client, "/docs/big.bin", len(data))
    r = await client.head(url, headers=h())
    assert r.headers["Upload-Length"] == str(len(data))
    assert r.headers["Upload-Metadata"] == meta(path="/docs/big.bin")
    assert int(r.headers["Upload-Offset"]) == 0
    cuts = [0, 1, 1024 * 1024, 2 * 1024 * 1024 + 5, len(data)]
    (staged,) = staged_dirs(node)
    inode = (staged / "data.part").stat().st_ino
    for i, (a, b) in enumerate(itertools.pairwise(cuts)):
        algo = ("sha1", "sha256", "md5", "sha1")[i]
        r = await patch(client, url, a, data[a:b], **{"Upload-Checksum": checksum(algo, data[a:b])})
        assert r.status == 204, await r.text()
        assert int(r.headers["Upload-Offset"]) == b
        assert r.headers["Tus-Resumable"] == "1.0.0"
        if b < len(data):
            assert "Upload-Expires" in r.headers
            # not visible before the last byte
            assert (await client.head("/v1/files/docs/big.bin", headers=auth())).status == 404
    r = await client.get("/v1/files/docs/big.bin", headers=auth())
    assert r.status == 200
    assert await r.read() == data
    assert r.headers["X-CallFS-Owner"] == "alice"
    # finished: HEAD still answers until it expires, and the staged bytes are gone
    assert await offset_of(client, url) == len(data)
    assert not (staged / "data.part").exists()
    # the staged file became the blob itself (a link and a rename, no copy)
    assert node.meta is not None
    entry = await node.meta.get("/docs/big.bin")
    assert entry is not None and entry.blob_key is not None
    key = entry.blob_key
    blob = Path(node.cfg.backend.localfs_root_path) / ".callfs" / "blobs" / key[:2] / key[2:4] / key
    assert blob.stat().st_ino == inode and blob.read_bytes() == data
    # the last PATCH repeated (a lost answer) is harmless; one more byte is refused
    assert (await patch(client, url, len(data), b"")).status == 204
    assert (await patch(client, url, len(data), b"x")).status == 413


async def test_creation_with_upload_and_empty_upload(client: Client) -> None:
    r = await client.post(
        "/v1/uploads",
        data=b"hello",
        headers=h(
            **OCTET, **{"Upload-Length": "11", "Upload-Metadata": meta(path="/greeting.txt")}
        ),
    )
    assert r.status == 201
    assert r.headers["Upload-Offset"] == "5"
    assert (await patch(client, r.headers["Location"], 5, b" world")).status == 204
    r = await client.get("/v1/files/greeting.txt", headers=auth())
    assert await r.read() == b"hello world"

    await create(client, "/empty.txt", 0)
    r = await client.get("/v1/files/empty.txt", headers=auth())
    assert r.status == 200 and await r.read() == b""


async def test_replaces_an_existing_file(client: Client) -> None:
    assert (await client.put("/v1/files/a.txt", data=b"old", headers=auth())).status == 201
    url = await create(client, "/a.txt", 3)
    assert (await patch(client, url, 0, b"new")).status == 204
    assert await (await client.get("/v1/files/a.txt", headers=auth())).read() == b"new"


async def test_protocol_errors(client: Client) -> None:
    url = await create(client, "/p.bin", 10)
    # wrong or missing Tus-Resumable: 412 with the supported version
    r = await client.head(url, headers={**auth(), "Tus-Resumable": "0.2.2"})
    assert r.status == 412
    assert r.headers["Tus-Version"] == "1.0.0"
    r = await client.post("/v1/uploads", headers={**auth(), "Upload-Length": "1"})
    assert r.status == 412
    # wrong content type: 415
    r = await client.patch(url, data=b"abc", headers=h(**{"Upload-Offset": "0"}))
    assert r.status == 415
    # missing length / path / bad metadata: 400
    r = await client.post("/v1/uploads", headers=h(**{"Upload-Metadata": meta(path="/x")}))
    assert r.status == 400
    r = await client.post("/v1/uploads", headers=h(**{"Upload-Length": "3"}))
    assert r.status == 400
    r = await client.post(
        "/v1/uploads", headers=h(**{"Upload-Length": "3", "Upload-Metadata": "path !!!"})
    )
    assert r.status == 400
    r = await client.post(
        "/v1/uploads",
        headers=h(**{"Upload-Length": "3", "Upload-Metadata": meta(path="/../etc/passwd")}),
    )
    assert r.status == 400
    # unknown checksum algorithm: 400
    r = await patch(client, url, 0, b"abc", **{"Upload-Checksum": "crc32 AAAAAA=="})
    assert r.status == 400
    # unknown or malformed upload: 404
    for bad in ("/v1/uploads/nope", url[:-1] + ("0" if url[-1] != "0" else "1")):
        r = await client.head(bad, headers=h())
        assert r.status == 404
        assert r.headers["Tus-Resumable"] == "1.0.0"
    assert await offset_of(client, url) == 0


async def test_wrong_offset_is_409_and_changes_nothing(client: Client) -> None:
    url = await create(client, "/o.bin", 10)
    assert (await patch(client, url, 0, b"01234")).status == 204
    for offset in (0, 3, 6, 10):
        r = await patch(client, url, offset, b"zz")
        assert r.status == 409
        assert (await r.json())["code"] == "UPLOAD_OFFSET_MISMATCH"
    assert await offset_of(client, url) == 5
    assert (await patch(client, url, 5, b"56789")).status == 204
    assert await (await client.get("/v1/files/o.bin", headers=auth())).read() == b"0123456789"


async def test_checksum_mismatch_is_460_and_offset_unchanged(client: Client) -> None:
    url = await create(client, "/c.bin", 8)
    assert (await patch(client, url, 0, b"abcd")).status == 204
    r = await patch(client, url, 4, b"efgh", **{"Upload-Checksum": checksum("sha256", b"EFGH")})
    assert r.status == 460
    assert (await r.json())["code"] == "CHECKSUM_MISMATCH"
    assert await offset_of(client, url) == 4
    r = await patch(client, url, 4, b"efgh", **{"Upload-Checksum": checksum("sha256", b"efgh")})
    assert r.status == 204
    assert await (await client.get("/v1/files/c.bin", headers=auth())).read() == b"abcdefgh"


async def test_body_past_the_length_is_413(client: Client) -> None:
    url = await create(client, "/l.bin", 4)
    r = await patch(client, url, 0, b"12345")
    assert r.status == 413
    assert await offset_of(client, url) == 0


async def test_termination(client: Client, node: Node) -> None:
    url = await create(client, "/t.bin", 100)
    assert (await patch(client, url, 0, b"x" * 50)).status == 204
    assert (await client.delete(url, headers=h(BOB_KEY))).status == 403
    r = await client.delete(url, headers=h())
    assert r.status == 204
    assert r.headers["Tus-Resumable"] == "1.0.0"
    assert staged_dirs(node) == []
    assert (await client.head(url, headers=h())).status == 404
    assert (await patch(client, url, 50, b"y")).status == 404
    assert (await client.delete(url, headers=h())).status == 404
    assert (await client.head("/v1/files/t.bin", headers=auth())).status == 404


async def test_permissions(client: Client) -> None:
    # alice's file and directory: bob may not upload over the file, may create in the directory
    assert (await client.put("/v1/files/home/alice.txt", data=b"a", headers=auth())).status == 201
    r = await client.post(
        "/v1/uploads",
        headers=h(
            BOB_KEY, **{"Upload-Length": "1", "Upload-Metadata": meta(path="/home/alice.txt")}
        ),
    )
    assert r.status == 403
    # onto a directory: 400; below a file: 409
    r = await client.post(
        "/v1/uploads", headers=h(**{"Upload-Length": "1", "Upload-Metadata": meta(path="/home")})
    )
    assert r.status == 400
    r = await client.post(
        "/v1/uploads",
        headers=h(**{"Upload-Length": "1", "Upload-Metadata": meta(path="/home/alice.txt/x")}),
    )
    assert r.status == 409
    # only the creator (or an admin) may see and continue an upload
    url = await create(client, "/home/mine.bin", 4)
    assert (await client.head(url, headers=h(BOB_KEY))).status == 403
    r = await client.patch(url, data=b"ab", headers=h(BOB_KEY, **OCTET, **{"Upload-Offset": "0"}))
    assert r.status == 403
    assert await offset_of(client, url) == 0
    assert await offset_of(client, url, INTERNAL) == 0
    # write permission is checked again at commit: bob's upload, then alice takes the path
    bob_url = await create(client, "/home/race.txt", 2, BOB_KEY)
    assert (await client.put("/v1/files/home/race.txt", data=b"a", headers=auth())).status == 201
    r = await client.patch(
        bob_url, data=b"bb", headers=h(BOB_KEY, **OCTET, **{"Upload-Offset": "0"})
    )
    assert r.status == 403
    assert await (await client.get("/v1/files/home/race.txt", headers=auth())).read() == b"a"
    # unauthenticated: 401 before anything
    r = await client.head(url, headers=TUS)
    assert r.status == 401


@pytest.mark.parametrize("config_env", [{"CALLFS_SERVER__MAX_UPLOAD_SIZE": "1000"}])
async def test_upload_length_over_the_limit_is_413(client: Client) -> None:
    r = await client.options("/v1/uploads", headers=auth())
    assert r.headers["Tus-Max-Size"] == "1000"
    r = await client.post(
        "/v1/uploads", headers=h(**{"Upload-Length": "1001", "Upload-Metadata": meta(path="/x")})
    )
    assert r.status == 413
    await create(client, "/x", 1000)


async def test_expired_uploads_answer_410_and_the_sweep_removes_their_bytes(
    client: Client, node: Node
) -> None:
    assert node.uploads is not None
    url = await create(client, "/e.bin", 10)
    assert (await patch(client, url, 0, b"12345")).status == 204
    kept = await create(client, "/k.bin", 10)
    assert len(staged_dirs(node)) == 2
    now = [0.0]
    real = node.uploads._clock
    node.uploads._clock = lambda: real() + now[0]
    assert await node.uploads.sweep() == 0
    # touched again just before the sweep: not abandoned (each PATCH renews Upload-Expires)
    now[0] = node.uploads.expiry - 5
    assert (await patch(client, kept, 0, b"1")).status == 204
    now[0] = node.uploads.expiry + 1
    r = await client.head(url, headers=h())
    assert r.status == 410
    assert len(staged_dirs(node)) == 1  # the expired one went with its answer
    assert await node.uploads.sweep() == 0
    assert (await client.head(url, headers=h())).status == 404
    now[0] = 2 * node.uploads.expiry
    assert await node.uploads.sweep() == 1
    assert staged_dirs(node) == []
    assert (await client.head(kept, headers=h())).status == 404


async def _raw_patch_cut_short(
    client: Client, url: str, offset: int, sent: bytes, total: int, extra: str = ""
) -> None:
    """A PATCH announcing ``total`` bytes that sends ``sent`` and then drops the connection."""
    assert client.server.host is not None and client.server.port is not None
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    head = (
        f"PATCH {url} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALICE_KEY}\r\n"
        f"Tus-Resumable: 1.0.0\r\nContent-Type: application/offset+octet-stream\r\n"
        f"Upload-Offset: {offset}\r\nContent-Length: {total}\r\n{extra}\r\n"
    )
    writer.write(head.encode() + sent)
    await writer.drain()
    await asyncio.sleep(0.3)
    writer.close()
    await writer.wait_closed()
    del reader


async def wait_offset(client: Client, url: str, expected: int) -> None:
    async with asyncio.timeout(10):
        while await offset_of(client, url) != expected:
            await asyncio.sleep(0.05)


async def test_resume_after_the_client_disconnects_mid_patch(client: Client) -> None:
    data = os.urandom(2 * 1024 * 1024)
    url = await create(client, "/resume.bin", len(data))
    acknowledged = 700_000
    assert (await patch(client, url, 0, data[:acknowledged])).status == 204
    # the next PATCH breaks off: what arrived is kept (fsync'd), never more than arrived
    await _raw_patch_cut_short(client, url, acknowledged, data[acknowledged:1_000_000], len(data))
    await wait_offset(client, url, 1_000_000)
    # with a checksum, a cut-off body counts for nothing
    whole = checksum("sha1", data[1_000_000:])
    await _raw_patch_cut_short(
        client,
        url,
        1_000_000,
        data[1_000_000:1_100_000],
        len(data) - 1_000_000,
        f"Upload-Checksum: {whole}\r\n",
    )
    await asyncio.sleep(0.3)
    offset = await offset_of(client, url)
    assert offset == 1_000_000
    r = await patch(client, url, offset, data[offset:])
    assert r.status == 204
    assert await (await client.get("/v1/files/resume.bin", headers=auth())).read() == data


async def test_resume_after_a_server_restart(
    tmp_path: Path, aiohttp_client: Callable[..., Any]
) -> None:
    data = os.urandom(1024 * 1024 + 99)
    first = Node(make_config(tmp_path))
    first.build()
    await first.start_components()
    try:
        c1 = await aiohttp_client(first.app)
        url = await create(c1, "/restart.bin", len(data))
        assert (await patch(c1, url, 0, data[:500_000])).status == 204
        # bytes written past the acknowledged offset (a crash before the state write) are cut
        (staged,) = staged_dirs(first)
        with open(staged / "data.part", "ab") as f:
            f.write(b"garbage that was never acknowledged")
        await c1.close()
    finally:
        await first.stop()
    second = Node(make_config(tmp_path))
    second.build()
    await second.start_components()
    try:
        c2 = await aiohttp_client(second.app)
        assert await offset_of(c2, url) == 500_000
        assert (await patch(c2, url, 500_000, data[500_000:])).status == 204
        assert await (await c2.get("/v1/files/restart.bin", headers=auth())).read() == data
    finally:
        await second.stop()


async def test_a_finished_but_uncommitted_upload_is_committed_by_the_sweep(
    client: Client, node: Node
) -> None:
    assert node.uploads is not None
    url = await create(client, "/late.bin", 3)
    service = node.uploads
    real_commit = service._commit

    async def crash(token: str, upload: Any) -> Any:
        raise OSError("crash before the commit")

    service._commit = crash  # type: ignore[method-assign]
    assert (await patch(client, url, 0, b"abc")).status == 500
    service._commit = real_commit  # type: ignore[method-assign]
    assert (await client.head("/v1/files/late.bin", headers=auth())).status == 404
    await service.sweep()
    assert await (await client.get("/v1/files/late.bin", headers=auth())).read() == b"abc"
    # a HEAD of such an upload commits it first (a client that lost the last PATCH's answer
    # asks HEAD, and an offset equal to the length tells it the upload is done: found by a
    # review); its error is HEAD's answer
    url = await create(client, "/late2.bin", 3)
    service._commit = crash  # type: ignore[method-assign]
    assert (await patch(client, url, 0, b"def")).status == 500
    assert (await client.head(url, headers=h())).status == 500
    service._commit = real_commit  # type: ignore[method-assign]
    assert await offset_of(client, url) == 3
    assert await (await client.get("/v1/files/late2.bin", headers=auth())).read() == b"def"


async def test_tuspy_uploads_resumes_and_is_byte_exact(client: Client, tmp_path: Path) -> None:
    client_mod = pytest.importorskip("tusclient.client")
    data = os.urandom(3 * 1024 * 1024 + 5)
    base = str(client.make_url("/v1/uploads"))
    headers = {"Authorization": f"Bearer {ALICE_KEY}"}

    def first_part() -> str:
        tus = client_mod.TusClient(base, headers=headers)
        up = tus.uploader(
            file_stream=io.BytesIO(data),
            chunk_size=512 * 1024,
            metadata={"path": "/tuspy/big.bin", "filename": "big.bin"},
            upload_checksum=True,
        )
        for _ in range(3):  # then the client "is killed"
            up.upload_chunk()
        assert up.offset == 3 * 512 * 1024
        return str(up.url)

    url = await asyncio.to_thread(first_part)

    def resume() -> None:
        tus = client_mod.TusClient(base, headers=headers)
        up = tus.uploader(file_stream=io.BytesIO(data), chunk_size=1024 * 1024, url=url)
        assert up.offset == 3 * 512 * 1024  # asked the server (HEAD)
        up.upload()

    await asyncio.to_thread(resume)
    r = await client.get("/v1/files/tuspy/big.bin", headers=auth())
    assert hashlib.sha256(await r.read()).digest() == hashlib.sha256(data).digest()


@pytest.mark.parametrize(
    "config_env",
    [
        {
            "CALLFS_ERASURE__ENABLED": "true",
            "CALLFS_ERASURE__DATA_SHARDS": "2",
            "CALLFS_ERASURE__PARITY_SHARDS": "1",
        }
    ],
)
async def test_erasure_when_the_metadata_asks_for_it(client: Client, node: Node) -> None:
    data = os.urandom(300_000)
    r = await client.post(
        "/v1/uploads",
        headers=h(
            **{
                "Upload-Length": str(len(data)),
                "Upload-Metadata": meta(path="/ec.bin", erasure="true"),
            }
        ),
    )
    assert r.status == 201
    assert (await patch(client, r.headers["Location"], 0, data)).status == 204
    assert node.meta is not None
    entry = await node.meta.get("/ec.bin")
    assert entry is not None and entry.backend_type.value == "erasure"
    assert await (await client.get("/v1/files/ec.bin", headers=auth())).read() == data


async def test_an_unreadable_upload_is_404_and_swept_after_the_expiry(
    client: Client, node: Node
) -> None:
    assert node.uploads is not None
    url = await create(client, "/bad.bin", 10)
    (staged,) = staged_dirs(node)
    (staged / "state.json").write_text("{not json")
    assert (await client.head(url, headers=h())).status == 500
    assert await node.uploads.sweep() == 0  # too young to be called abandoned
    old = node.uploads._clock() - node.uploads.expiry - 1
    os.utime(staged, (old, old))
    assert await node.uploads.sweep() == 1
    assert staged_dirs(node) == []


async def test_a_cancelled_patch_closes_its_file_only_after_the_write_thread(
    client: Client, node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PATCH cancelled while a write runs in its thread (server shutdown, a timeout) closes the
    upload's descriptor only once that write has ended: a descriptor closed under it could be
    reused by another open before its next ``os.write``, which would then land in that file."""
    assert node.uploads is not None
    url = await create(client, "/cancelled.bin", 3 * 1024 * 1024)
    upload_id = url.rsplit("/", 1)[1]
    real = uploads_module._write_blocking
    ready, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def held_write(fd: int, parts: list[bytes], hasher: Any) -> None:
        ready.set()
        release.wait(10)
        try:
            real(fd, parts, hasher)
        except BaseException as exc:
            errors.append(exc)
            raise

    monkeypatch.setattr(uploads_module, "_write_blocking", held_write)

    async def body() -> Any:
        for _ in range(2):  # two write batches: the first one is held
            yield b"c" * (1024 * 1024)

    task = asyncio.ensure_future(node.uploads.append(Identity("alice"), upload_id, 0, body()))
    assert await asyncio.to_thread(ready.wait, 10)
    task.cancel()
    await asyncio.sleep(0.05)  # the old code closed the descriptor here
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert errors == [], "a write ran on a descriptor closed under it"


async def test_a_patch_cancelled_while_it_opens_the_upload_closes_what_it_opened(
    client: Client, node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert node.uploads is not None
    url = await create(client, "/opening.bin", 1024)
    upload_id = url.rsplit("/", 1)[1]
    real = node.uploads._open_data_blocking
    ready, release, done = threading.Event(), threading.Event(), threading.Event()
    opened: list[tuple[int, str]] = []

    def held_open(token: str, offset: int) -> int:
        ready.set()
        release.wait(10)
        try:
            fd = real(token, offset)
            opened.append((fd, os.readlink(f"/proc/self/fd/{fd}")))
            return fd
        finally:
            done.set()

    monkeypatch.setattr(node.uploads, "_open_data_blocking", held_open)

    async def body() -> Any:
        yield b"o" * 1024

    task = asyncio.ensure_future(node.uploads.append(Identity("alice"), upload_id, 0, body()))
    assert await asyncio.to_thread(ready.wait, 10)
    task.cancel()
    await asyncio.sleep(0.05)
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await asyncio.to_thread(done.wait, 10)
    await asyncio.sleep(0.05)  # the old code dropped the descriptor here, open
    [(fd, path)] = opened
    try:
        still = os.readlink(f"/proc/self/fd/{fd}")
    except FileNotFoundError:
        still = None
    assert still != path, "the upload's descriptor leaked"


async def test_audit_fixes_numbers_override_trailing_slash_and_failed_creation(
    client: Client, node: Node
) -> None:
    """From a tus audit: a non-ASCII digit in Upload-Length was a 500 (now 400); a creation
    whose first bytes fail left an upload nobody could find or delete (none now); the endpoint
    ``/v1/uploads/`` was 404; ``X-HTTP-Method-Override`` (core protocol, "MUST") was 405; an
    upload ID naming no node was 502 (404: unknown)."""
    for bad in ("\u00b2", "\u0665", "+5", "5x"):
        r = await client.post(
            "/v1/uploads",
            headers=h(**{"Upload-Length": bad, "Upload-Metadata": meta(path="/n.bin")}),
        )
        assert r.status == 400, bad
        assert r.headers["Tus-Resumable"] == "1.0.0"
    before = staged_dirs(node)
    for body, extra in (
        (b"12345", {"Upload-Length": "3"}),
        (b"abc", {"Upload-Length": "3", "Upload-Checksum": checksum("md5", b"xyz")}),
    ):
        r = await client.post(
            "/v1/uploads",
            data=body,
            headers=h(**OCTET, **extra, **{"Upload-Metadata": meta(path="/f.bin")}),
        )
        assert r.status in (413, 460), await r.text()
        assert "Location" not in r.headers
    assert staged_dirs(node) == before  # nothing left that nobody can resume or delete
    r = await client.post(
        "/v1/uploads/", headers=h(**{"Upload-Length": "4", "Upload-Metadata": meta(path="/s.bin")})
    )
    assert r.status == 201
    url = r.headers["Location"]
    assert url.startswith("/v1/uploads/") and not url.startswith("/v1/uploads//")
    assert (await client.options("/v1/uploads/", headers=auth())).status == 204
    r = await client.post(
        url,
        data=io.BytesIO(b"da"),
        headers=h(**OCTET, **{"Upload-Offset": "0", "X-HTTP-Method-Override": "PATCH"}),
    )
    assert r.status == 204 and r.headers["Upload-Offset"] == "2"
    r = await client.post(url, headers=h(**{"X-HTTP-Method-Override": "HEAD"}))
    assert r.status == 200 and r.headers["Upload-Offset"] == "2"
    assert (await client.post(url, headers=h())).status == 405  # POST itself: no such method
    r = await client.post(url, headers=h(**{"X-HTTP-Method-Override": "DELETE"}))
    assert r.status == 204
    assert (await client.head(url, headers=h())).status == 404
    nowhere = base64.urlsafe_b64encode(b"nosuchnode").decode().rstrip("=") + "." + "0" * 32
    r = await client.head(f"/v1/uploads/{nowhere}", headers=h())
    assert r.status == 404


async def test_every_answer_is_framed_and_an_expired_upload_is_not_terminated(
    client: Client, node: Node
) -> None:
    """From the same audit: the router's 404 and 405 and the pipeline's 401 carried no
    ``Tus-Resumable``; a HEAD error carried no ``Cache-Control: no-store``; DELETE of an
    expired upload answered 204 as if it had ended a live one (410 now, like HEAD)."""
    url = await create(client, "/x.bin", 10)
    for method, target, headers, status in (
        ("GET", url, h(), 405),  # no GET route on an upload
        ("PUT", "/v1/uploads", h(), 405),
        ("HEAD", url + "/more", h(), 404),  # no such route
        ("PATCH", "/v1/uploads/a/b", h(**OCTET, **{"Upload-Offset": "0"}), 404),
        ("HEAD", url, TUS, 401),  # no credentials
        ("POST", "/v1/%75ploads", TUS, 401),  # the router's spelling of the same route
        ("HEAD", "/v1/uploads/nope", h(), 404),
    ):
        r = await client.request(method, target, headers=headers)
        assert r.status == status, (method, target)
        assert r.headers.get("Tus-Resumable") == "1.0.0", (method, target)
        if method == "HEAD":
            assert r.headers.get("Cache-Control") == "no-store", target
    r = await client.get("/v1/files/x.bin", headers=auth())  # not a tus route: not framed
    assert r.status == 404 and "Tus-Resumable" not in r.headers

    assert node.uploads is not None
    assert (await patch(client, url, 0, b"12345")).status == 204
    real = node.uploads._clock
    node.uploads._clock = lambda: real() + node.uploads.expiry + 1  # type: ignore[union-attr]
    assert (await client.delete(url, headers=h(BOB_KEY))).status == 403  # still not yours
    r = await client.delete(url, headers=h())
    assert r.status == 410
    assert staged_dirs(node) == []  # its bytes went all the same
    assert (await client.delete(url, headers=h())).status == 404


async def test_a_commit_tried_again_never_puts_old_bytes_over_a_later_write(
    client: Client, node: Node
) -> None:
    """From a crash-safety review, which demonstrated it with kill -9: the final PATCH commits,
    the process dies before the upload's state records it, and after the restart another
    client's PUT is acknowledged; the sweep (or the client retrying its PATCH) then committed
    the upload's older bytes over that write. A commit tried again now publishes only if the
    destination is unchanged since the last PATCH began; if the destination names the upload's
    own bytes it is done; otherwise the outcome is in doubt (409, nothing published)."""
    service = node.uploads
    assert service is not None
    real_save = service._save_blocking
    real_put = node.engine.put_file

    def crash_at_the_committed_record(token: str, upload: Any) -> None:
        if upload.committed:
            raise OSError("killed after the commit, before its record")
        real_save(token, upload)

    async def failing_put(*args: Any, **kwargs: Any) -> Any:
        raise Unavailable("the store went away before the commit")

    async def read(path: str) -> bytes:
        return await (await client.get(f"/v1/files{path}", headers=auth())).read()

    # 1. the commit happened, its record did not; then a later acknowledged PUT
    url = await create(client, "/c.bin", 5)
    service._save_blocking = crash_at_the_committed_record  # type: ignore[method-assign]
    assert (await patch(client, url, 0, b"AAAAA")).status == 500
    service._save_blocking = real_save  # type: ignore[method-assign]
    put = await client.put("/v1/files/c.bin", data=b"BBBBB", headers=auth())
    assert put.status == 200
    await service.sweep()
    assert await read("/c.bin") == b"BBBBB"
    r = await patch(client, url, 5, b"")  # the client retrying its PATCH: in doubt
    assert r.status == 409, await r.text()
    assert (await client.head(url, headers=h())).status == 409  # and asking HEAD: the same
    assert await read("/c.bin") == b"BBBBB"

    # 2. the commit happened and nothing came after: done, not made twice
    url = await create(client, "/d.bin", 3)
    service._save_blocking = crash_at_the_committed_record  # type: ignore[method-assign]
    assert (await patch(client, url, 0, b"abc")).status == 500
    service._save_blocking = real_save  # type: ignore[method-assign]
    first = await node.engine.find("/d.bin")
    await service.sweep()
    assert await node.engine.find("/d.bin") == first  # no second version
    assert await read("/d.bin") == b"abc"
    assert (await patch(client, url, 3, b"")).status == 204  # and a retry is told so

    # 3. the commit failed; the old file was then renamed away: never a 2xx for bytes that did
    # not land (a review of the first version of this fix found that one)
    assert (await client.put("/v1/files/e.bin", data=b"old", headers=auth())).status == 201
    url = await create(client, "/e.bin", 3)
    node.engine.put_file = failing_put  # type: ignore[method-assign]
    assert (await patch(client, url, 0, b"new")).status == 503
    node.engine.put_file = real_put  # type: ignore[method-assign]
    moved = await client.patch(
        "/v1/files/e.bin", json={"destination": "/e-old.bin"}, headers=auth()
    )
    assert moved.status == 200
    assert (await patch(client, url, 3, b"")).status == 409
    assert await read("/e-old.bin") == b"old"

    # 4. the commit failed and nothing changed: the retry publishes
    url = await create(client, "/f.bin", 3)
    node.engine.put_file = failing_put  # type: ignore[method-assign]
    assert (await patch(client, url, 0, b"fff")).status == 503
    node.engine.put_file = real_put  # type: ignore[method-assign]
    assert (await patch(client, url, 3, b"")).status == 204
    assert await read("/f.bin") == b"fff"

    # 5. the commit was refused (nothing applied), the cause is fixed, which changes the
    # destination: the retry is a plain commit, not one in doubt (a second review found it
    # answered 409 until the upload expired)
    async def refusing_put(*args: Any, **kwargs: Any) -> Any:
        raise PermissionDenied()

    assert (await client.put("/v1/files/g.bin", data=b"old", headers=auth())).status == 201
    url = await create(client, "/g.bin", 3)
    node.engine.put_file = refusing_put  # type: ignore[method-assign]
    assert (await patch(client, url, 0, b"ggg")).status == 403
    node.engine.put_file = real_put  # type: ignore[method-assign]
    assert (await client.put("/v1/files/g.bin", data=b"fixed", headers=auth())).status == 200
    assert (await patch(client, url, 3, b"")).status == 204
    assert await read("/g.bin") == b"ggg"
