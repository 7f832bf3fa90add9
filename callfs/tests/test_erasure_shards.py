"""ShardIO.write: the holder's SHA-256 of what it stored comes back with the 201; a holder that
does not send it (an earlier version, mid rolling upgrade) has its shard read back and hashed."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from callfs.erasure.shards import SHA256_HEADER, ShardIO, hashed
from callfs.errors import InsufficientStorage, InternalError, PeerUnavailable
from callfs.storage.localfs import LocalFSBackend


class _Peers:
    def __init__(self, base: str, session: aiohttp.ClientSession) -> None:
        self.base = base
        self._session = session

    def require_endpoint(self, instance_id: str) -> str:
        return self.base

    @property
    def session(self) -> aiohttp.ClientSession:
        return self._session

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": "Bearer s"}


async def _chunks(data: bytes, size: int = 100_000) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


@pytest.mark.parametrize("holder", ["current", "earlier", "lying"])
async def test_remote_checksum_comes_from_the_holder(
    holder: str, aiohttp_server: Callable[..., Any]
) -> None:
    stored: dict[str, bytes] = {}
    reads = 0

    async def shard(request: web.Request) -> web.StreamResponse:
        nonlocal reads
        key = request.match_info["tail"]
        if request.method == "PUT":
            stored[key] = await request.read()
            headers = {}
            if holder == "current":
                headers[SHA256_HEADER] = hashlib.sha256(stored[key]).hexdigest()
            elif holder == "lying":  # the holder is trusted (internal secret): its answer is kept
                headers[SHA256_HEADER] = "AB" * 32
            return web.Response(status=201, headers=headers)
        reads += 1
        return web.Response(body=stored[key])

    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/v1/internal/shards/{tail:.+}", shard)
    server = await aiohttp_server(app)
    data = os.urandom(3_000_001)
    async with aiohttp.ClientSession() as session:
        io = ShardIO("me", None, _Peers(str(server.make_url("")).rstrip("/"), session))  # type: ignore[arg-type]
        checksum = await io.write("peer", "u" * 32, 1, _chunks(data))
    assert stored[f"{'u' * 32}/1"] == data
    want = {"current": hashlib.sha256(data).hexdigest(), "earlier": None, "lying": "ab" * 32}
    assert checksum == (want[holder] or hashlib.sha256(data).hexdigest())
    assert reads == (1 if holder == "earlier" else 0)


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (401, InternalError),
        (500, InternalError),
        (507, InsufficientStorage),
        (None, PeerUnavailable),
    ],
)
async def test_a_holder_that_refuses_a_shard_is_500_an_unreachable_one_502(
    answer: int | None, error: type[Exception], aiohttp_server: Callable[..., Any]
) -> None:
    """API.md §11.2: 502 PEER_UNAVAILABLE if a node was unreachable, otherwise 500 (507 when the
    holder is out of space, as for a local write)."""

    async def refuse(request: web.Request) -> web.StreamResponse:
        await request.read()
        return web.Response(status=answer or 500, text="no")

    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/v1/internal/shards/{tail:.+}", refuse)
    server = await aiohttp_server(app)
    base = str(server.make_url("")).rstrip("/")
    if answer is None:
        await server.close()  # nobody listens there any more
    async with aiohttp.ClientSession() as session:
        io = ShardIO("me", None, _Peers(base, session))  # type: ignore[arg-type]
        with pytest.raises(error):
            await io.write("peer", "u" * 32, 0, _chunks(b"shard bytes"))


async def test_local_shard_is_hashed_as_it_is_stored(tmp_path: Path) -> None:
    backend = LocalFSBackend(str(tmp_path))
    await backend.start()
    try:
        data = os.urandom(2_500_000)
        checksum = await ShardIO("me", backend, None).write("me", "v" * 32, 0, _chunks(data))
        assert checksum == hashlib.sha256(data).hexdigest()
        assert (tmp_path / ".erasure" / ("v" * 32) / "0").read_bytes() == data
    finally:
        await backend.close()


async def test_hashed_passes_chunks_through_and_completes_the_digest() -> None:
    data = os.urandom(5_000_000)
    digest = hashlib.sha256()
    out = [bytes(c) async for c in hashed(_chunks(data, 333_333), digest)]
    assert b"".join(out) == data
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()


async def test_hashed_stopped_early_waits_for_its_thread_and_leaves_no_stray_error() -> None:
    """A consumer that stops mid-stream leaves no hashing job behind, and a hashing job that
    failed is never reported as an exception nobody retrieved."""
    import asyncio
    import gc

    class Failing:
        def update(self, _data: object) -> None:
            raise ValueError("boom")

    loop = asyncio.get_running_loop()
    unretrieved: list[object] = []
    loop.set_exception_handler(lambda _loop, ctx: unretrieved.append(ctx))
    data = os.urandom(5 << 20)
    try:
        for digest in (hashlib.sha256(), Failing()):
            # stop after the first MiB went to the pool, before anyone awaited it
            it = hashed(_chunks(data, 300_000), digest)  # type: ignore[arg-type]
            got = 0
            async for chunk in it:
                got += len(chunk)
                if got > 1 << 20:
                    break
            await it.aclose()
        # read to the end: the failure reaches the consumer
        with pytest.raises(ValueError, match="boom"):
            async for _ in hashed(_chunks(data, 300_000), Failing()):  # type: ignore[arg-type]
                pass
        gc.collect()
        await asyncio.sleep(0.05)
    finally:
        loop.set_exception_handler(None)
    assert unretrieved == []
