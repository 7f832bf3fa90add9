"""WebSocket transfers (API.md §9.9) with aiohttp's real client."""

from __future__ import annotations

import asyncio
import io
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient

from callfs.daemon import Node
from callfs.errors import Unavailable
from callfs.tests.functional.conftest import BOB_KEY, auth

Client = TestClient[Any, Any]
MiB = 1 << 20


async def upload(
    client: Client, path: str, frames: list[bytes], end: str = "EOF", key: str | None = None
) -> tuple[list[Any], int | None]:
    """Send frames, end the upload, and collect what the server sends back."""
    ws = await client.ws_connect(
        f"/v1/files/ws/{path}?mode=upload",
        headers=auth(key) if key else auth(),
        max_msg_size=4 * MiB,
    )
    for frame in frames:
        await ws.send_bytes(frame)
    if end == "EOF":
        await ws.send_str("EOF")
    elif end == "close":
        await ws.close(code=1000)
    got = []
    async for msg in ws:
        got.append(msg)
    return got, ws.close_code


async def test_upload_then_download(client: Client, node: Node) -> None:
    blob = os.urandom(300_000)
    frames = [blob[i : i + 100_000] for i in range(0, len(blob), 100_000)]
    got, code = await upload(client, "ws-up/data.bin", frames)
    assert [m.data for m in got if m.type == WSMsgType.TEXT] == ["ok:300000"]
    assert code == 1000
    assert await (await client.get("/v1/files/ws-up/data.bin", headers=auth())).read() == blob

    ws = await client.ws_connect("/v1/files/ws/ws-up/data.bin", headers=auth())
    received = bytearray()
    async for msg in ws:
        assert msg.type == WSMsgType.BINARY
        assert len(msg.data) <= 65536
        received += msg.data
    assert bytes(received) == blob
    assert ws.close_code == 1000


@pytest.mark.parametrize("size", [1, 125, 126, 65535, 65536, 65537, 2 * 65536 + 100, 3 << 20])
async def test_download_messages_are_whole_64_kib_pieces_in_order(
    client: Client, size: int
) -> None:
    """Every message but the last carries 65536 bytes (each header form: 7-bit, 16-bit and
    64-bit lengths), in order; several 1 MiB reads go out as one batch of frames each."""
    blob = os.urandom(size)
    r = await client.put("/v1/files/sizes.bin", data=io.BytesIO(blob), headers=auth())
    assert r.status in (200, 201)
    ws = await client.ws_connect("/v1/files/ws/sizes.bin", headers=auth())
    sizes, received = [], bytearray()
    async for msg in ws:
        assert msg.type == WSMsgType.BINARY
        sizes.append(len(msg.data))
        received += msg.data
    assert bytes(received) == blob and ws.close_code == 1000
    assert sizes == [65536] * (size // 65536) + ([size % 65536] if size % 65536 else [])


async def test_upload_replaces_and_close_frame_commits(client: Client) -> None:
    await upload(client, "f.txt", [b"first"])
    _, code = await upload(client, "f.txt", [b"second"], end="close")
    assert code == 1000
    assert await (await client.get("/v1/files/f.txt", headers=auth())).read() == b"second"


async def test_aborted_upload_stores_nothing(client: Client, node: Node) -> None:
    ws = await client.ws_connect("/v1/files/ws/abort.bin?mode=upload", headers=auth())
    await ws.send_bytes(b"x" * 1000)
    await ws.close(code=4000)
    assert (await client.get("/v1/files/abort.bin", headers=auth())).status == 404
    root = Path(node.cfg.backend.localfs_root_path)
    assert not [p for p in root.rglob("*") if p.is_file()]


async def test_oversized_message_closes_1009(client: Client) -> None:
    _got, code = await upload(client, "big.bin", [b"y" * (MiB + 1)])
    assert code == 1009
    assert (await client.get("/v1/files/big.bin", headers=auth())).status == 404
    _, code = await upload(client, "exact.bin", [b"y" * MiB])
    assert code == 1000


@pytest.mark.parametrize("config_env", [{"CALLFS_SERVER__MAX_UPLOAD_SIZE": "2000"}])
async def test_upload_cap(client: Client) -> None:
    _, code = await upload(client, "cap.bin", [b"z" * 1500, b"z" * 1500])
    assert code == 1009
    assert (await client.get("/v1/files/cap.bin", headers=auth())).status == 404


async def test_download_close_codes(client: Client) -> None:
    ws = await client.ws_connect("/v1/files/ws/missing.bin", headers=auth())
    async for _ in ws:
        pass
    assert ws.close_code == 1008
    await client.post("/v1/files/empty", data=b"", headers=auth())
    ws = await client.ws_connect("/v1/files/ws/empty", headers=auth())
    msgs = [m async for m in ws]
    assert msgs == []
    assert ws.close_code == 1000


async def test_write_denied_and_directory_target(client: Client) -> None:
    await client.post("/v1/files/alice.txt", data=b"a", headers=auth())
    _got, code = await upload(client, "alice.txt", [b"b"], key=BOB_KEY)
    assert code == 1008
    assert await (await client.get("/v1/files/alice.txt", headers=auth())).read() == b"a"


async def test_handshake_refusals(client: Client) -> None:
    await client.post("/v1/files/d/", headers=auth())
    cases = [
        ("/v1/files/ws/x.bin", {}, 401),
        ("/v1/files/ws/..%2Fx", auth(), 400),
        ("/v1/files/ws/a%0Ab", auth(), 400),  # a line feed: an invalid path
        ("/v1/files/ws/dir/", auth(), 400),
        ("/v1/files/ws/x.bin?mode=sideways", auth(), 400),
        ("/v1/files/ws/d?mode=upload", auth(), 400),
        ("/v1/files/ws/x.bin", {**auth(), "Origin": "https://evil.example"}, 403),
    ]
    for url, headers, status in cases:
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await client.ws_connect(url, headers=headers)
        assert info.value.status == status, url
    resp = await client.get("/v1/files/ws/x.bin", headers=auth())
    assert resp.status == 400
    # only RFC 6455's version 13 (aiohttp took the drafts' 7 and 8 too; from an audit)
    for version in ("8", "7", "14"):
        resp = await client.get(
            "/v1/files/ws/x.bin",
            headers={
                **auth(),
                "Upgrade": "websocket",
                "Connection": "Upgrade",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                "Sec-WebSocket-Version": version,
            },
        )
        assert resp.status == 400, version
    host = f"{client.server.host}:{client.server.port}"
    ws = await client.ws_connect(
        "/v1/files/ws/missing?mode=%20Download%20",
        headers={**auth(), "Origin": f"http://{host}"},
    )
    async for _ in ws:
        pass
    assert ws.close_code == 1008
    # other methods on ws/... reach the file handlers
    resp = await client.put("/v1/files/ws/file.txt", data=b"w", headers=auth())
    assert resp.status == 201


async def test_the_stall_watch_counts_a_shrinking_queue_as_progress(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A chunk's frames are queued at once: while the transport's queue keeps shrinking the
    reader is slow, not stalled; once it stops shrinking for write_timeout, it is cut off."""
    from callfs.api import websocket

    cut: list[object] = []
    monkeypatch.setattr(websocket, "cut_off", cut.append)

    class Transport:
        queued = 4 * MiB

        def get_write_buffer_size(self) -> int:
            return self.queued

    class Request:
        transport = Transport()

    request = Request()
    watch = websocket._StallWatch(request, 0.2)  # type: ignore[arg-type]
    try:
        watch.sending()
        for _ in range(12):  # 0.6 s, three times write_timeout, 64 KiB every 0.05 s
            await asyncio.sleep(0.05)
            request.transport.queued -= 64 * 1024
        assert cut == [] and not watch.fired
        await asyncio.sleep(0.4)  # nothing leaves any more
        assert cut == [request] and watch.fired
    finally:
        watch.close()


async def closed_with(client: Client, path: str) -> tuple[int, str]:
    """Upload a few bytes to ``path`` (EOF): the close code and reason the server sends."""
    ws = await client.ws_connect(f"/v1/files/ws/{path}?mode=upload", headers=auth())
    await ws.send_bytes(b"data")
    await ws.send_str("EOF")
    while True:
        msg = await asyncio.wait_for(ws.receive(), 10)
        if msg.type == WSMsgType.CLOSE:
            return msg.data, msg.extra
        assert msg.type == WSMsgType.TEXT, msg


async def test_an_upload_under_a_file_closes_1011_file_create_failed(client: Client) -> None:
    """§9.9: only a directory target closes with 1003; a parent that is a file is one of the
    other failures (1011 ``file create failed``)."""
    assert (await client.post("/v1/files/afile", data=b"x", headers=auth())).status == 201
    assert await closed_with(client, "afile/child") == (1011, "file create failed")
    assert (await client.get("/v1/files/afile", headers=auth())).status == 200


async def test_a_metadata_failure_after_the_upgrade_closes_1011_metadata_lookup_failed(
    client: Client, node: Node
) -> None:
    """The upgrade is done when the upload looks its target up: a store failure there closes
    the WebSocket (1011 ``metadata lookup failed``), it never writes an HTTP answer into it."""
    engine = node.engine
    assert engine is not None
    real_find = engine.find
    calls: list[str] = []

    async def find(path: str) -> Any:
        calls.append(path)
        if path == "/boom.bin" and len(calls) > 1:  # the handshake's look-up passes
            raise Unavailable("injected store failure")
        return await real_find(path)

    engine.find = find  # type: ignore[method-assign]
    assert await closed_with(client, "boom.bin") == (1011, "metadata lookup failed")
    engine.find = real_find  # type: ignore[method-assign]
    assert (await client.get("/v1/files/boom.bin", headers=auth())).status == 404
