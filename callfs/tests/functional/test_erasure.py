"""Erasure-coded files on one node (all shards local): streamed encode, exact whole and range
reads, the manifest and shard endpoints, re-encoding PUT, delete, and corruption never producing
wrong bytes (API.md §11)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from callfs.daemon import Node
from callfs.erasure.codec import DEFAULT_BLOCK
from callfs.tests.functional.conftest import INTERNAL, auth, raw_url

E = {**auth(), "X-CallFS-Erasure": "true"}


#: The node of these tests: erasure coding on, 2+1 by default.
ERASURE_ON = {
    "CALLFS_ERASURE__ENABLED": "true",
    "CALLFS_ERASURE__DATA_SHARDS": "2",
    "CALLFS_ERASURE__PARITY_SHARDS": "1",
}


@pytest.fixture
def config_env() -> dict[str, str]:
    return dict(ERASURE_ON)


def shard_files(tmp_path: Path) -> list[Path]:
    root = tmp_path / "files" / ".erasure"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


#: Bytes per stripe of the 2+1 profile these tests use.
STRIPE = 2 * DEFAULT_BLOCK
SIZES = [0, 1, 100, STRIPE - 1, STRIPE, STRIPE + 1, 3 * STRIPE + 12345]


@pytest.mark.parametrize("size", SIZES)
async def test_round_trip_whole_and_ranges(
    client: TestClient[Any, Any], tmp_path: Path, size: int
) -> None:
    data = os.urandom(size)
    resp = await client.post("/v1/files/e.bin", data=io.BytesIO(data), headers=E)
    assert resp.status == 201, await resp.text()
    resp = await client.get("/v1/files/e.bin", headers=auth())
    assert resp.status == 200
    assert await resp.read() == data
    head = await client.head("/v1/files/e.bin", headers=auth())
    assert head.headers["Content-Length"] == str(size)
    if size:
        for a, b in [(0, 0), (size - 1, size - 1), (size // 3, size // 2), (1, size - 1)]:
            if a > b:
                continue
            r = await client.get("/v1/files/e.bin", headers={**auth(), "Range": f"bytes={a}-{b}"})
            assert r.status == 206
            assert await r.read() == data[a : b + 1], (a, b)
    assert len(shard_files(tmp_path)) == 3


async def test_manifest_and_shard_endpoints(client: TestClient[Any, Any]) -> None:
    data = os.urandom(700_000)
    assert (
        await client.post(
            "/v1/files/dir%20x/m.bin?erasure=true&data_shards=2&parity_shards=2",
            data=io.BytesIO(data),
            headers={**auth(), "X-CallFS-Erasure": "true"},
        )
    ).status == 201
    resp = await client.get("/v1/files/dir%20x/m.bin?manifest=true", headers=auth())
    assert resp.status == 200
    raw = await resp.read()
    assert raw.endswith(b"\n")
    manifest = json.loads(raw)
    assert manifest["path"] == "/dir x/m.bin"
    assert manifest["original_size"] == 700_000
    assert manifest["erasure_profile"]["data_shards"] == 2
    assert manifest["erasure_profile"]["parity_shards"] == 2
    assert [s["index"] for s in manifest["shards"]] == [0, 1, 2, 3]
    for shard in manifest["shards"]:
        assert shard["endpoint"].endswith(f"/v1/shards/dir%20x/m.bin/{shard['index']}")
        r = await client.get(f"/v1/shards/dir%20x/m.bin/{shard['index']}", headers=auth())
        assert r.status == 200
        body = await r.read()
        assert len(body) == shard["size"] == manifest["erasure_profile"]["shard_size"]
        assert hashlib.sha256(body).hexdigest() == shard["checksum"]
    assert (await client.get("/v1/shards/dir%20x/m.bin/9", headers=auth())).status == 404
    assert (await client.get("/v1/shards/dir%20x/m.bin/x", headers=auth())).status == 400
    # the index is an integer, its segment decoded once (§9.11, §21)
    assert (await client.get("/v1/shards/dir%20x/m.bin/-1", headers=auth())).status == 404
    r = await client.get("/v1/shards/dir%20x/m.bin/" + "9" * 5000, headers=auth())
    assert r.status == 404
    for spelling in ("%30", "+0", "00"):
        r = await client.get(f"/v1/shards/dir%20x/m.bin/{spelling}", headers=auth())
        assert r.status == 200, spelling
    for spelling in ("1.0", "%FF", "%2B%2B1", ""):
        r = await client.get(f"/v1/shards/dir%20x/m.bin/{spelling}", headers=auth())
        assert r.status == 400, spelling
    r = await client.get("/v1/shards/dir%20x/a%0Ab/0", headers=auth())  # was a 404 (audit)
    assert r.status == 400


async def test_bad_parameters_are_400_and_change_nothing(
    client: TestClient[Any, Any], tmp_path: Path
) -> None:
    for headers in (
        {"X-CallFS-Erasure-Data-Shards": "0"},
        {"X-CallFS-Erasure-Parity-Shards": "-1"},
        {"X-CallFS-Erasure-Data-Shards": "x"},
        {"X-CallFS-Erasure-Data-Shards": ""},
        {"X-CallFS-Erasure-Data-Shards": "200", "X-CallFS-Erasure-Parity-Shards": "57"},
        {"X-CallFS-Erasure-Instances": "no-such-node"},
        {"X-CallFS-Erasure-Data-Shards": "9" * 5000},  # int() raised: a 500 (audit)
    ):
        resp = await client.post("/v1/files/bad.bin", data=b"abc", headers={**E, **headers})
        assert resp.status == 400, (headers, await resp.text())
    for query in ("data_shards=%202", "data_shards=2%20", "data_shards=2_0"):  # as v1 (Atoi)
        resp = await client.post(f"/v1/files/bad.bin?{query}", data=b"abc", headers=E)
        assert resp.status == 400, query
    assert (await client.get("/v1/files/bad.bin", headers=auth())).status == 404
    assert shard_files(tmp_path) == []
    # the header wins over the query
    resp = await client.post(
        "/v1/files/ok.bin?data_shards=0",
        data=b"abc",
        headers={**E, "X-CallFS-Erasure-Data-Shards": "3"},
    )
    assert resp.status == 201
    resp = await client.post("/v1/files/plus.bin?data_shards=%2B2", data=b"abc", headers=E)
    assert resp.status == 201  # "+2" is 2, as Go's Atoi reads it (was 400)


async def test_parameter_400s_come_before_the_existence_check(
    client: TestClient[Any, Any], tmp_path: Path
) -> None:
    """§8: a bad parameter is 400 even when the path exists (it was 409 for an unknown instance
    and for a total over 256 reached with the node's default parity); an empty instance list
    names no node, so it takes the default placement (§11.1 refuses unknown IDs only)."""
    assert (await client.post("/v1/files/there.bin", data=b"x", headers=auth())).status == 201
    for query in ("instances=no-such-node", "data_shards=256"):  # + the default parity (1)
        resp = await client.post(f"/v1/files/there.bin?{query}", data=b"abc", headers=E)
        assert resp.status == 400, (query, await resp.text())
    for headers in ({"X-CallFS-Erasure-Instances": ""}, {"X-CallFS-Erasure-Instances": " , "}):
        resp = await client.post("/v1/files/e.bin", data=b"abc", headers={**E, **headers})
        assert resp.status == 201, (headers, await resp.text())
        assert (await client.delete("/v1/files/e.bin", headers=auth())).status == 204
    assert shard_files(tmp_path) == []


async def test_put_re_encodes_and_delete_removes_every_shard(
    client: TestClient[Any, Any], tmp_path: Path
) -> None:
    one, two = os.urandom(300_000), os.urandom(900_000)
    assert (await client.post("/v1/files/p.bin", data=io.BytesIO(one), headers=E)).status == 201
    before = shard_files(tmp_path)
    assert (await client.put("/v1/files/p.bin", data=io.BytesIO(two), headers=auth())).status == 200
    assert await (await client.get("/v1/files/p.bin", headers=auth())).read() == two
    after = shard_files(tmp_path)
    assert len(after) == 3 and not set(before) & set(after)  # new upload id, old shards gone
    # rename is metadata only
    resp = await client.patch("/v1/files/p.bin", json={"name": "q.bin"}, headers=auth())
    assert resp.status == 200, await resp.text()
    assert await (await client.get("/v1/files/q.bin", headers=auth())).read() == two
    assert shard_files(tmp_path) == after
    assert (await client.delete("/v1/files/q.bin", headers=auth())).status == 204
    assert shard_files(tmp_path) == []
    # nor their directories: one empty .erasure/<upload id>/ per file had stayed (audit)
    assert list((tmp_path / "files" / ".erasure").iterdir()) == []


async def test_a_corrupt_or_missing_shard_never_gives_wrong_bytes(
    client: TestClient[Any, Any], tmp_path: Path
) -> None:
    data = os.urandom(2 * STRIPE + 777)
    assert (await client.post("/v1/files/c.bin", data=io.BytesIO(data), headers=E)).status == 201
    shards = shard_files(tmp_path)
    # flip one byte in the middle of shard 0 (a data shard): reads rebuild from the others
    first = shards[0]
    raw = bytearray(first.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    first.write_bytes(bytes(raw))
    assert await (await client.get("/v1/files/c.bin", headers=auth())).read() == data
    r = await client.get("/v1/files/c.bin", headers={**auth(), "Range": "bytes=600000-700000"})
    assert await r.read() == data[600000:700001]
    # the public shard endpoint refuses to serve the corrupt shard
    assert (await client.get("/v1/shards/c.bin/0", headers=auth())).status == 500
    # a second shard gone: stripe 1 cannot be rebuilt. The first stripe is fine, so the answer
    # has started: the connection is cut, a short body, never a wrong one
    shards[1].unlink()
    resp = await client.get("/v1/files/c.bin", headers=auth())
    assert resp.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()
    # damage in the first stripe too: decided before any byte -> 503
    raw[10] ^= 0xFF
    first.write_bytes(bytes(raw))
    resp = await client.get("/v1/files/c.bin", headers=auth())
    assert resp.status == 503
    assert (await resp.json())["code"] == "INSUFFICIENT_SHARDS"


async def test_internal_shard_endpoint_needs_the_secret(
    client: TestClient[Any, Any], tmp_path: Path
) -> None:
    key = "0123456789abcdef0123456789abcdef"
    url = f"/v1/internal/shards/{key}/0"
    assert (await client.put(url, data=b"x", headers=auth())).status == 401
    bearer = {"Authorization": f"Bearer {INTERNAL}"}
    stored = await client.put(url, data=b"shard-bytes", headers=bearer)
    assert stored.status == 201 and await stored.read() == b""
    assert stored.headers["X-CallFS-Shard-SHA256"] == hashlib.sha256(b"shard-bytes").hexdigest()
    assert (tmp_path / "files" / ".erasure" / key / "0").read_bytes() == b"shard-bytes"
    r = await client.get(url, headers={**bearer, "Range": "bytes=6-10"})
    assert r.status == 206 and await r.read() == b"bytes"
    assert (await client.get(f"/v1/internal/shards/{key}/x", headers=bearer)).status == 400
    assert (await client.get("/v1/internal/shards/../../x/0", headers=bearer)).status in (400, 404)
    assert (await client.delete(url, headers=bearer)).status == 204
    assert (await client.delete(url, headers=bearer)).status == 204
    assert (await client.get(url, headers=bearer)).status == 404


async def test_internal_shard_keys_are_validated_like_paths(
    client: TestClient[Any, Any], tmp_path: Path
) -> None:
    """§12.6: ``{key}`` is everything between the prefix and the last ``/``, validated like a
    path (a v1 node's content-hash keys, or any other, are stored at ``.erasure/<key>/<index>``);
    ``{index}`` is an integer; another method is 405 with an empty body."""
    bearer = {"Authorization": f"Bearer {INTERNAL}"}
    for key in ("k1", "a/b", "v1-" + "ab" * 32):
        url = f"/v1/internal/shards/{key}/3"
        assert (await client.put(url, data=b"s-" + key.encode(), headers=bearer)).status == 201
        for span in ("bytes=\u00b2-", "bytes=0-" + "9" * 5000):  # int() raised on both: 500
            got = await client.get(url, headers={**bearer, "Range": span})
            assert got.status in (200, 206), span
        assert (tmp_path / "files" / ".erasure" / key / "3").read_bytes() == b"s-" + key.encode()
        got = await client.get(url, headers=bearer)
        assert got.status == 200 and await got.read() == b"s-" + key.encode()
        assert (await client.delete(url, headers=bearer)).status == 204
        assert (await client.get(url, headers=bearer)).status == 404
    # a%0Ab: the route pattern did not match a decoded line feed (a JSON 404; found by an audit)
    for bad in ("a%5Cb", "a%00b", "a%0Ab", "a%E2%80%AEb", "..", "a/../b", "a//b", "./a", "%2e%2e"):
        resp = await client.session.put(
            raw_url(client, f"/v1/internal/shards/{bad}/0"), data=b"x", headers=bearer
        )
        assert resp.status == 400, bad
        assert resp.content_type == "text/plain"
    key = "0123456789abcdef0123456789abcdef"
    assert (await client.get(f"/v1/internal/shards/{key}/-1", headers=bearer)).status == 404
    assert (await client.get(f"/v1/internal/shards/{key}/1x", headers=bearer)).status == 400
    resp = await client.post(f"/v1/internal/shards/{key}/0", headers=bearer)
    assert resp.status == 405
    assert await resp.read() == b""
    assert set(resp.headers["Allow"].split(",")) == {"DELETE", "GET", "PUT"}
    assert "X-Request-ID" not in resp.headers  # internal: no pipeline


async def test_disabled_node_ignores_the_flag(tmp_path: Path, aiohttp_client: Any) -> None:
    from callfs.tests.functional.conftest import make_config

    node = Node(make_config(tmp_path))
    node.build()
    await node.start_components()
    try:
        client = await aiohttp_client(node.app)
        resp = await client.post("/v1/files/plain.bin", data=b"abc", headers=E)
        assert resp.status == 201
        head = await client.head("/v1/files/plain.bin", headers=auth())
        assert head.headers.get("X-CallFS-Instance-ID")  # a plain localfs file
    finally:
        await node.stop()


async def test_a_node_with_erasure_off_still_reads_and_deletes_erasure_coded_files(
    tmp_path: Path, aiohttp_client: Any
) -> None:
    """§11.4: every node can read the file. A node whose erasure.enabled is false (here the same
    data directory, restarted with it off) reads it byte-exact and deletes it with its shards;
    it writes no shards (a PUT's re-encoding is 400, new uploads ignore the flag). It was 400
    for the read, and the delete left the shards."""
    from callfs.tests.functional.conftest import make_config

    data = os.urandom(2 * STRIPE + 5)
    on = Node(make_config(tmp_path, **ERASURE_ON))
    on.build()
    await on.start_components()
    try:
        client = await aiohttp_client(on.app)
        resp = await client.post("/v1/files/ec.bin", data=io.BytesIO(data), headers=E)
        assert resp.status == 201
    finally:
        await on.stop()
    assert len(shard_files(tmp_path)) == 3
    off = Node(make_config(tmp_path))
    off.build()
    await off.start_components()
    try:
        client = await aiohttp_client(off.app)
        resp = await client.get("/v1/files/ec.bin", headers=auth())
        assert resp.status == 200, await resp.text()
        assert await resp.read() == data
        r = await client.get("/v1/files/ec.bin", headers={**auth(), "Range": "bytes=5-9"})
        assert r.status == 206 and await r.read() == data[5:10]
        # a PUT re-encodes: shards this node would keep but not serve (no shard routes here)
        resp = await client.put("/v1/files/ec.bin", data=b"new", headers=auth())
        assert resp.status == 400
        assert len(shard_files(tmp_path)) == 3
        assert await (await client.get("/v1/files/ec.bin", headers=auth())).read() == data
        assert (await client.delete("/v1/files/ec.bin", headers=auth())).status == 204
        assert shard_files(tmp_path) == []
        resp = await client.post("/v1/files/new.bin", data=b"abc", headers=E)
        assert resp.status == 201
        assert shard_files(tmp_path) == []  # a plain file: this node takes no new ones
    finally:
        await off.stop()


async def test_repair_rebuilds_missing_and_corrupt_shards(
    client: TestClient[Any, Any], node: Node, tmp_path: Path
) -> None:
    data = os.urandom(3 * STRIPE + 99)
    assert (await client.post("/v1/files/r/a.bin", data=io.BytesIO(data), headers=E)).status == 201
    assert (await client.post("/v1/files/r/b.bin", data=b"small", headers=E)).status == 201
    bearer = {"Authorization": f"Bearer {INTERNAL}"}
    resp = await client.post("/v1/internal/erasure/repair", json={}, headers=bearer)
    assert await resp.json() == {
        "checked": 2,
        "healthy": 2,
        "repaired": 0,
        "shards_rebuilt": 0,
        "unrecoverable": [],
        "failed": [],
    }
    manifest = await (await client.get("/v1/files/r/a.bin?manifest=true", headers=auth())).json(
        content_type=None
    )
    size = manifest["erasure_profile"]["shard_size"]
    files = [p for p in shard_files(tmp_path) if p.stat().st_size == size]
    assert len(files) == 3
    files[0].unlink()  # one shard gone
    raw = bytearray(files[1].read_bytes())
    raw[5] ^= 1
    files[1].write_bytes(bytes(raw))  # another corrupt: 2 of 3 bad -> unrecoverable
    resp = await client.post(
        "/v1/internal/erasure/repair", json={"path": "/r/a.bin"}, headers=bearer
    )
    report = await resp.json()
    assert report["unrecoverable"] == ["/r/a.bin"]
    # put the corrupt one back right: one shard lost -> rebuilt from the other two
    raw[5] ^= 1
    files[1].write_bytes(bytes(raw))
    resp = await client.post("/v1/internal/erasure/repair", json={"path": "/r"}, headers=bearer)
    report = await resp.json()
    assert (report["repaired"], report["shards_rebuilt"], report["healthy"]) == (1, 1, 1)
    assert files[0].exists()
    resp = await client.post("/v1/internal/erasure/repair", json={}, headers=bearer)
    assert (await resp.json())["healthy"] == 2
    assert await (await client.get("/v1/files/r/a.bin", headers=auth())).read() == data
    for shard in manifest["shards"]:
        r = await client.get(f"/v1/shards/r/a.bin/{shard['index']}", headers=auth())
        assert r.status == 200
    metrics = await (await client.get("/metrics", headers=auth())).text()
    assert "callfs_erasure_shards_repaired_total 1.0" in metrics
    assert (await client.post("/v1/internal/erasure/repair", json={}, headers=auth())).status == 401
    assert node.maintenance is not None


async def test_legacy_sha256_framed_files_still_read_and_repair(
    client: TestClient[Any, Any], node: Node, tmp_path: Path
) -> None:
    """Layouts written before the XXH3 frame, the short tail and the recorded block size (no
    ``frame``, ``tail``, ``block_size`` kept: 256 KiB blocks, SHA-256 after every block, the last
    stripe padded) read byte-exact, ranges included, and repair rebuilds them in their own
    frame."""
    from dataclasses import replace

    from callfs.erasure.codec import LEGACY_BLOCK, Codec

    data = os.urandom(2 * STRIPE + 4321)
    assert (await client.post("/v1/files/old.bin", data=io.BytesIO(data), headers=E)).status == 201
    assert node.meta is not None
    entry = await node.meta.get("/old.bin")
    assert entry is not None and entry.blob_key is not None
    layout = await node.meta.get_erasure(entry.blob_key)
    assert layout is not None and layout.frame == "xxh3k"
    # rewrite the shards as the old code did, and the layout as it stored it
    legacy = Codec(2, 1, LEGACY_BLOCK, "sha256")
    shards = [bytearray() for _ in range(3)]
    for s in range(legacy.stripes(len(data))):
        stripe = data[s * legacy.stripe_size : (s + 1) * legacy.stripe_size]
        for shard, framed in zip(shards, legacy.encode_stripe(stripe), strict=True):
            shard += framed
    root = tmp_path / "files" / ".erasure" / layout.upload_id
    for shard, raw in zip(layout.shards, shards, strict=True):
        (root / str(shard.index)).write_bytes(bytes(raw))
    old = replace(
        layout,
        frame="sha256",
        tail=False,
        block_size=0,
        shard_size=legacy.shard_size(len(data)),
        shards=tuple(
            replace(s, size=len(raw), checksum=hashlib.sha256(raw).hexdigest())
            for s, raw in zip(layout.shards, shards, strict=True)
        ),
    )
    await node.meta.put_erasure(old)
    assert (await node.meta.get_erasure(entry.blob_key)) == old
    assert await (await client.get("/v1/files/old.bin", headers=auth())).read() == data
    r = await client.get("/v1/files/old.bin", headers={**auth(), "Range": "bytes=500000-600000"})
    assert await r.read() == data[500000:600001]
    (root / "0").unlink()
    bearer = {"Authorization": f"Bearer {INTERNAL}"}
    resp = await client.post("/v1/internal/erasure/repair", json={}, headers=bearer)
    assert (await resp.json())["shards_rebuilt"] == 1
    assert (root / "0").read_bytes() == bytes(shards[0])
    assert await (await client.get("/v1/files/old.bin", headers=auth())).read() == data


async def _open_erasure_stream(client: TestClient[Any, Any], node: Node, data: bytes) -> Any:
    assert (await client.post("/v1/files/a.bin", data=io.BytesIO(data), headers=E)).status == 201
    engine = node.engine
    assert engine is not None and engine.erasure is not None
    entry = await engine.find("/a.bin")
    assert entry is not None
    return await engine.erasure.open(await engine.erasure_layout(entry), 0, len(data))


@pytest.mark.parametrize("cancelled", [False, True])
async def test_a_read_closed_mid_stream_ends_its_read_ahead_before_closing_the_shards(
    client: TestClient[Any, Any], node: Node, cancelled: bool
) -> None:
    """Stripes are read ahead (a feeder task) while the current one is sent. A client that
    leaves after the first piece: closing ends the feeder before it closes the shard streams it
    reads, and closes them even when the closer itself is cancelled meanwhile (the handler of a
    client that left is)."""
    data = os.urandom(8 * STRIPE)
    stream = await _open_erasure_stream(client, node, data)
    it = aiter(stream)
    first = await anext(it)
    assert bytes(first) == data[: len(first)]
    feeder = stream._feeder
    assert feeder is not None and not feeder.done()  # the next stripes are on their way
    if cancelled:
        closer = asyncio.ensure_future(stream.aclose())
        await asyncio.sleep(0)  # the close has begun: it waits for the feeder
        closer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closer
    else:
        await stream.aclose()
    assert feeder.done()
    assert not stream._reader._open  # every shard stream closed
    await it.aclose()
    assert await (await client.get("/v1/files/a.bin", headers=auth())).read() == data


async def test_a_read_racing_a_replace_that_dropped_the_shards_reads_the_new_version(
    client: TestClient[Any, Any], node: Node
) -> None:
    """A replace removes the old shards before the old layout record: a reader that looked the
    file up before the replace and opens it in between finds the layout but not the shards. It
    reads the version that replaced it (was: 503 INSUFFICIENT_SHARDS)."""
    old, new = os.urandom(3 * STRIPE + 5), os.urandom(STRIPE + 7)
    assert (await client.post("/v1/files/r.bin", data=io.BytesIO(old), headers=E)).status == 201
    engine = node.engine
    assert engine is not None
    real_stat = engine.stat

    async def stat(who: Any, path: Any) -> Any:
        entry = await real_stat(who, path)
        if entry.path == "/r.bin" and not stat.fired:  # type: ignore[attr-defined]
            stat.fired = True  # type: ignore[attr-defined]
            layout = await engine.erasure_layout(entry)
            resp = await client.put("/v1/files/r.bin", data=io.BytesIO(new), headers=E)
            assert resp.status == 200
            await engine._meta.put_erasure(layout)  # the old record, its shards already gone
        return entry

    stat.fired = False  # type: ignore[attr-defined]
    engine.stat = stat  # type: ignore[method-assign]
    resp = await client.get("/v1/files/r.bin", headers=auth())
    assert stat.fired  # type: ignore[attr-defined]
    assert resp.status == 200, await resp.text()
    assert await resp.read() == new
    assert resp.headers["X-CallFS-Size"] == str(len(new))


@pytest.mark.parametrize("late", [{1}, {0, 2}])
async def test_late_shards_are_read_around_or_waited_for_when_nothing_else_is_left(
    client: TestClient[Any, Any], node: Node, monkeypatch: pytest.MonkeyPatch, late: set[int]
) -> None:
    """A holder later than SHARD_WAIT is read around with parity (a frozen holder had made every
    read a 503 after file_op_timeout). With more late shards than parity (a slow link, not a
    frozen holder), the late ones are asked again and waited for: slow, not a 503 (found by a
    review of the first version)."""
    from callfs.erasure import service as service_module

    data = os.urandom(3 * STRIPE + 999)
    r = await client.post("/v1/files/late.bin", data=io.BytesIO(data), headers=E)
    assert r.status == 201
    shard_io = node.engine._erasure().io
    real_open = shard_io.open
    asked: list[int] = []

    async def slow_open(holder: str, upload_id: str, index: int, offset: int, length: int) -> Any:
        asked.append(index)
        if index in late:
            await asyncio.sleep(0.3)
        return await real_open(holder, upload_id, index, offset, length)

    monkeypatch.setattr(service_module, "SHARD_WAIT", 0.1)
    monkeypatch.setattr(shard_io, "open", slow_open)
    got = await client.get("/v1/files/late.bin", headers=auth())
    assert got.status == 200
    assert await got.read() == data
    if late == {1}:
        assert 2 in asked  # parity read instead of the late data shard


async def test_a_timeout_while_waiting_for_a_late_shard_is_a_failure_not_a_loop(
    client: TestClient[Any, Any], node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From a review: once only late shards were left, a TimeoutError raised from inside the
    patient wait (ETIMEDOUT from a disk, say) counted as "late" again and the fallback ran
    again, for ever."""
    from callfs.erasure import service as service_module

    data = os.urandom(2 * STRIPE + 5)
    r = await client.post("/v1/files/t.bin", data=io.BytesIO(data), headers=E)
    assert r.status == 201
    shard_io = node.engine._erasure().io
    real_open = shard_io.open
    calls: dict[int, int] = {}

    async def flaky_open(holder: str, upload_id: str, index: int, offset: int, length: int) -> Any:
        calls[index] = calls.get(index, 0) + 1
        if index in (0, 2):
            if calls[index] == 1:
                await asyncio.sleep(0.3)  # late the first time
            else:
                raise TimeoutError("ETIMEDOUT")  # and then failing, not late
        return await real_open(holder, upload_id, index, offset, length)

    monkeypatch.setattr(service_module, "SHARD_WAIT", 0.1)
    monkeypatch.setattr(shard_io, "open", flaky_open)
    async with asyncio.timeout(10):
        got = await client.get("/v1/files/t.bin", headers=auth())
    assert got.status == 503
    assert (await got.json())["code"] == "INSUFFICIENT_SHARDS"
    assert calls[0] == calls[2] == 2


async def test_a_shard_put_in_another_ones_place_is_never_read(
    client: TestClient[Any, Any], node: Node, tmp_path: Path
) -> None:
    """Found by review: the block tags were a plain hash of the block, so a whole shard of
    another file of the same size (or another shard of the same file) copied into a shard's
    place passed every check, and GET answered 200 with the other file's bytes mixed in. Tags
    are now seeded with the upload, the shard index and the stripe: the misplaced shard is
    refused block by block and the file is rebuilt from the others."""
    import hashlib

    files = {p: os.urandom(2 * STRIPE + 1000) for p in ("/sw/g", "/sw/h")}
    for path, data in files.items():
        resp = await client.post(f"/v1/files{path}", data=io.BytesIO(data), headers=E)
        assert resp.status == 201

    async def shard(path: str, index: int) -> Path:
        resp = await client.get(f"/v1/files{path}?manifest=true", headers=auth())
        want = (await resp.json(content_type=None))["shards"][index]["checksum"]
        (found,) = [
            p for p in shard_files(tmp_path) if hashlib.sha256(p.read_bytes()).hexdigest() == want
        ]
        return found

    g0, h0, h1 = await shard("/sw/g", 0), await shard("/sw/h", 0), await shard("/sw/h", 1)
    g0.write_bytes(h0.read_bytes())  # another upload's shard 0
    got = await client.get("/v1/files/sw/g", headers=auth())
    assert (got.status, await got.read()) == (200, files["/sw/g"])
    h0.write_bytes(h1.read_bytes())  # the same file's shard 1 in shard 0's place (equal size)
    got = await client.get("/v1/files/sw/h", headers=auth())
    assert got.status in (200, 503)
    if got.status == 200:
        assert await got.read() == files["/sw/h"]


@pytest.fixture
def small_uploads(config_env: dict[str, str]) -> None:
    config_env["CALLFS_SERVER__MAX_UPLOAD_SIZE"] = str(1 << 20)


async def test_an_internal_shard_over_the_upload_limit_is_413(
    small_uploads: None, client: TestClient[Any, Any], tmp_path: Path
) -> None:
    """§12.6: a shard PUT over ``server.max_upload_size`` is 413; it stored any size (found by
    review). The limit allows the block tags a 1+m profile's shard adds to a file at the limit."""
    import collections.abc

    from callfs.api.erasure import shard_cap

    bearer = {"Authorization": f"Bearer {INTERNAL}"}
    key = "0123456789abcdef0123456789abcdef"
    cap = shard_cap(1 << 20)

    async def chunked(size: int) -> collections.abc.AsyncIterator[bytes]:
        for i in range(0, size, 65536):
            yield b"z" * min(65536, size - i)

    at_cap = io.BytesIO(b"z" * cap)
    ok = await client.put(f"/v1/internal/shards/{key}/0", data=at_cap, headers=bearer)
    assert ok.status == 201
    for n, body in enumerate((io.BytesIO(b"z" * (cap + 1)), chunked(cap + 1))):
        resp = await client.put(f"/v1/internal/shards/{key}/{n + 1}", data=body, headers=bearer)
        assert (resp.status, await resp.text()) == (413, "shard too large\n")
        assert not (tmp_path / "files" / ".erasure" / key / str(n + 1)).exists()


async def test_a_holder_is_lost_after_the_grace_or_once_it_is_no_peer(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The automatic pass leaves a down holder's shards to it for ``DOWN_GRACE``; a holder that
    is no peer any more (``callfs cluster remove``) is lost at once (a review found the pass
    would otherwise wait for it forever: a removed node is never probed)."""
    from callfs.core import maintenance

    upkeep = node.maintenance
    assert upkeep is not None
    peers = ["node-2"]
    monkeypatch.setattr(upkeep, "_peer_ids", lambda: peers)
    monkeypatch.setattr(upkeep._peers, "endpoint", lambda _n: None)  # node-2 never answers
    assert await upkeep.live_nodes() == [node.cfg.instance_discovery.instance_id]
    assert not upkeep.lost("node-2")  # down, within the grace
    monkeypatch.setattr(maintenance, "DOWN_GRACE", 0.0)
    assert upkeep.lost("node-2")
    monkeypatch.setattr(maintenance, "DOWN_GRACE", 600.0)
    peers.clear()  # removed from the cluster
    assert upkeep.lost("node-2")
    assert not upkeep.lost(node.cfg.instance_discovery.instance_id)
