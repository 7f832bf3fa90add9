"""Fault injection on the write path: the metadata store or the backend fails, or a metadata
command applies and then times out ("maybe applied"), at each step of every mutating use case.

After each fault, readers see the whole old state or the whole new state, never a mix; nothing is
left referenced that cannot be read; and the same request, retried once the fault is gone,
succeeds.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from callfs.daemon import Node
from callfs.errors import Unavailable, VersionConflict
from callfs.model import Identity
from callfs.paths import parse_body_path
from callfs.tests.functional.conftest import auth, unreferenced_files

Client = TestClient[Any, Any]

OLD = b"old version " * 5000
NEW = b"NEW" * 1234


@dataclass
class Faults:
    """Which store method or backend call fails next, and how."""

    target: str = ""
    mode: str = ""  # "fail": refused before it runs; "late": runs, then the caller times out
    fired: list[str] = field(default_factory=list)


class FaultyStore:
    def __init__(self, inner: Any, faults: Faults) -> None:
        self._inner = inner
        self._faults = faults

    def __getattr__(self, name: str) -> Any:
        real = getattr(self._inner, name)
        if name != self._faults.target or not callable(real):
            return real

        async def faulty(*args: Any, **kwargs: Any) -> Any:
            self._faults.fired.append(name)
            self._faults.target = ""
            if self._faults.mode == "late":
                await real(*args, **kwargs)
            raise Unavailable("injected fault")

        return faulty


class FaultyBackend(FaultyStore):
    async def stage(self, key: str, chunks: Any) -> Any:
        staged = await self._inner.stage(key, chunks)
        if self._faults.target != "publish":
            return staged
        faults = self._faults
        inner_publish = staged.publish

        async def publish() -> None:
            faults.fired.append("publish")
            faults.target = ""
            if faults.mode == "late":
                await inner_publish()
            raise OSError("injected disk fault")

        staged.publish = publish
        return staged


@pytest.fixture
def faults(node: Node) -> Faults:
    f = Faults()
    engine = node.engine
    assert engine is not None
    engine._meta = FaultyStore(engine._meta, f)  # type: ignore[assignment]
    engine._backends = {k: FaultyBackend(b, f) for k, b in engine._backends.items()}  # type: ignore[misc]
    return f


async def body_of(client: Client, path: str) -> bytes | None:
    resp = await client.get(f"/v1/files/{path}", headers=auth())
    if resp.status == 404:
        return None
    assert resp.status == 200, await resp.text()
    return await resp.read()


async def listing(client: Client, path: str) -> list[str]:
    resp = await client.get(f"/v1/files/{path}/", headers=auth())
    if resp.status == 404:
        return []
    return sorted(i["name"] for i in await resp.json())


@dataclass(frozen=True)
class Case:
    name: str
    setup: Callable[[Client], Awaitable[None]]
    act: Callable[[Client], Awaitable[Any]]
    #: readers' view: a tuple compared against ``before`` / ``after``
    view: Callable[[Client], Awaitable[Any]]
    ok_status: int
    faults: tuple[str, ...]


async def put(client: Client, path: str, data: bytes) -> Any:
    return await client.put(f"/v1/files/{path}", data=data, headers=auth())


async def no_setup(client: Client) -> None:
    return None


async def setup_old(client: Client) -> None:
    assert (await put(client, "d/f.bin", OLD)).status == 201


async def setup_tree(client: Client) -> None:
    assert (await put(client, "t/a/1.bin", OLD)).status == 201
    assert (await put(client, "t/b/2.bin", NEW)).status == 201


async def view_file(client: Client) -> Any:
    return (await body_of(client, "d/f.bin"), await listing(client, "d"))


async def view_move(client: Client) -> Any:
    return (
        await body_of(client, "d/f.bin"),
        await body_of(client, "e/g.bin"),
        await listing(client, "d"),
    )


async def view_tree(client: Client) -> Any:
    return (
        await body_of(client, "t/a/1.bin"),
        await body_of(client, "t/b/2.bin"),
        await listing(client, "t"),
    )


WRITE_FAULTS = ("publish", "create", "update", "get")

CASES = [
    Case(
        "PUT new",
        no_setup,
        lambda c: put(c, "d/f.bin", NEW),
        view_file,
        201,
        ("publish", "create", "get"),
    ),
    Case(
        "PUT replace",
        setup_old,
        lambda c: put(c, "d/f.bin", NEW),
        view_file,
        200,
        ("publish", "update", "get", "delete"),
    ),
    Case(
        "POST",
        no_setup,
        lambda c: c.post("/v1/files/d/f.bin", data=NEW, headers=auth()),
        view_file,
        201,
        ("publish", "create"),
    ),
    Case(
        "PATCH move",
        setup_old,
        lambda c: c.patch(
            "/v1/files/d/f.bin",
            json={"destination": "/e/g.bin", "create_parents": True},
            headers=auth(),
        ),
        view_move,
        200,
        ("move", "get"),
    ),
    Case(
        "DELETE file",
        setup_old,
        lambda c: c.delete("/v1/files/d/f.bin", headers=auth()),
        view_file,
        204,
        ("delete", "get"),
    ),
    Case(
        "DELETE tree",
        setup_tree,
        lambda c: c.delete("/v1/files/t?recursive=true", headers=auth()),
        view_tree,
        204,
        ("delete_tree", "get"),
    ),
]


@pytest.mark.parametrize("mode", ["fail", "late"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_a_fault_never_mixes_versions(
    client: Client, node: Node, faults: Faults, case: Case, mode: str
) -> None:
    await case.setup(client)
    before = await case.view(client)
    resp = await case.act(client)
    assert resp.status == case.ok_status  # the reference run, without faults
    after = await case.view(client)
    assert after != before
    for target in case.faults:
        # fresh state for each injected fault
        admin = {"Authorization": f"Bearer {node.cfg.auth.internal_proxy_secret}"}
        assert (await client.delete("/v1/files/?recursive=true", headers=admin)).status == 204
        await case.setup(client)
        assert await case.view(client) == before
        faults.target, faults.mode, faults.fired = target, mode, []
        resp = await case.act(client)
        assert faults.fired and set(faults.fired) == {target}, f"no fault on {target}"
        seen = await case.view(client)
        assert seen in (before, after), (target, mode, resp.status, seen)
        if resp.status >= 500:
            assert (await resp.json())["code"] in ("UNAVAILABLE", "INTERNAL_ERROR")
        # the fault is gone: the same request converges on the new state (a retry after a
        # "maybe applied" may answer 404/409 because the first attempt did apply)
        if seen == before:
            retry = await case.act(client)
            assert retry.status == case.ok_status, (target, mode, await retry.text())
        assert await case.view(client) == after
        # every blob an entry names is readable, and every blob on disk is named (orphans
        # of an ambiguous commit wait for the sweep, which removes them)
        assert node.engine is not None
        await node.engine.sweep_orphans(grace=0.0)
        assert await unreferenced_files(node) == []


async def test_orphan_sweep_keeps_every_referenced_blob(client: Client, node: Node) -> None:
    for i in range(5):
        assert (await put(client, f"s/{i}.bin", NEW)).status == 201
    assert (await put(client, "s/0.bin", OLD)).status == 200
    assert node.engine is not None
    assert await node.engine.sweep_orphans(grace=0.0) == 0
    for i in range(1, 5):
        assert await body_of(client, f"s/{i}.bin") == NEW
    assert await body_of(client, "s/0.bin") == OLD


class Rival:
    """A writer elsewhere (another node or worker process, no lock in common) that replaces the
    entry just before each of the engine's next ``rounds`` conditional updates, so each of those
    genuinely loses its race in the store."""

    def __init__(self, inner: Any, rounds: int) -> None:
        self._inner = inner
        self.rounds = rounds
        self.lost = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def update(self, entry: Any, expected_version: int) -> Any:
        if self.rounds > 0:
            self.rounds -= 1
            current = await self._inner.get(entry.path)
            await self._inner.update(current, current.version)
        try:
            return await self._inner.update(entry, expected_version)
        except VersionConflict:
            self.lost += 1
            raise


def rival(node: Node, rounds: int) -> Rival:
    assert node.engine is not None
    store = Rival(node.engine._meta, rounds)
    node.engine._meta = store  # type: ignore[assignment]
    return store


async def test_a_put_that_loses_many_races_in_a_row_still_lands(client: Client, node: Node) -> None:
    """16 PUTs of one path through two worker processes lost eight straight rounds about one
    run in six and answered 503; a writer now keeps deciding again until the lock timeout."""
    await setup_old(client)
    other = rival(node, rounds=40)
    resp = await put(client, "d/f.bin", NEW)
    assert resp.status == 200, await resp.text()
    assert other.lost == 40
    assert await body_of(client, "d/f.bin") == NEW
    assert await unreferenced_files(node) == []


class Deleter:
    """A request elsewhere (another worker process or node) that deletes the entry just before
    the engine's next conditional update."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.deleted = 0
        self.orphan: str | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def update(self, entry: Any, expected_version: int) -> Any:
        if not self.deleted:
            self.deleted += 1
            current = await self._inner.get(entry.path)
            await self._inner.delete(current.path, current.version)
            self.orphan = current.blob_key  # that request's own reclaim, not run here
        return await self._inner.update(entry, expected_version)


async def test_a_put_whose_file_is_deleted_meanwhile_creates_it(client: Client, node: Node) -> None:
    """Found by review with four worker processes: a PUT racing a DELETE (or a rename away) of
    its path answered 404 ``FILE_NOT_FOUND`` (28 of 200) — the update found no entry. A PUT of a
    missing path creates it (§9.6): it decides again."""
    await setup_old(client)
    assert node.engine is not None
    other = Deleter(node.engine._meta)
    node.engine._meta = other  # type: ignore[assignment]
    resp = await put(client, "d/f.bin", NEW)
    assert resp.status == 201, await resp.text()
    assert other.deleted == 1
    assert await body_of(client, "d/f.bin") == NEW
    assert [p.name for p in await unreferenced_files(node)] == [other.orphan]


@pytest.fixture
def short_lock_timeout(config_env: dict[str, str]) -> None:
    config_env["CALLFS_DLM__LOCK_TIMEOUT"] = "1s"


async def test_a_put_that_never_wins_answers_503_by_the_lock_timeout(
    short_lock_timeout: None, client: Client, node: Node
) -> None:
    await setup_old(client)
    other = rival(node, rounds=10**9)
    started = time.monotonic()
    resp = await put(client, "d/f.bin", NEW)
    took = time.monotonic() - started
    assert resp.status == 503
    assert (await resp.json())["message"] == "the item kept changing; try again"
    assert resp.headers["Retry-After"] == "1"
    assert 1.0 <= took < 3.0, took
    assert other.lost > 10
    other.rounds = 0
    # Every refusal was definite: the old version stays whole and the new blob is gone at once.
    assert await body_of(client, "d/f.bin") == OLD
    assert await unreferenced_files(node) == []


def replace_after_stat(node: Node, data: bytes) -> list[int]:
    """The next ``stat`` returns the entry it read, after a PUT of ``data`` to the same path has
    replaced it and reclaimed its blob: the reader then opens a blob that is gone."""
    engine = node.engine
    assert engine is not None
    real_stat = engine.stat
    fired: list[int] = []

    async def stat(who: Identity, path: Any) -> Any:
        entry = await real_stat(who, path)
        if not fired:
            fired.append(1)

            async def body() -> Any:
                yield data

            await engine.put_file(Identity("alice"), parse_body_path(entry.path), body())
        return entry

    engine.stat = stat  # type: ignore[method-assign]
    return fired


async def test_a_replace_between_stat_and_open_is_answered_with_the_version_opened(
    client: Client, node: Node
) -> None:
    """Headers and bytes of one version, never the headers of the old over the new."""
    old, new = b"o" * 100_000, b"n" * 10_000
    assert (await put(client, "d/f.bin", old)).status == 201
    fired = replace_after_stat(node, new)
    resp = await client.get("/v1/files/d/f.bin", headers=auth())
    assert fired
    assert resp.status == 200
    assert await resp.read() == new
    assert resp.headers["X-CallFS-Size"] == str(len(new))
    assert resp.headers["Content-Length"] == str(len(new))


@pytest.mark.parametrize(
    ("wanted", "status", "body", "content_range"),
    [
        ("bytes=5000-5999", 206, slice(5000, 6000), "bytes 5000-5999/10000"),
        ("bytes=9000-50000", 206, slice(9000, 10000), "bytes 9000-9999/10000"),
        ("bytes=-100", 206, slice(9900, 10000), "bytes 9900-9999/10000"),
        ("bytes=50000-50999", 416, None, "bytes */10000"),
    ],
)
async def test_a_range_read_across_a_replace_is_decided_on_the_version_opened(
    client: Client,
    node: Node,
    wanted: str,
    status: int,
    body: slice | None,
    content_range: str,
) -> None:
    old = bytes(range(256)) * 400  # 102,400 bytes
    new = bytes(reversed(range(256))) * 39 + b"tail" * 4  # 10,000 bytes
    assert len(new) == 10_000
    assert (await put(client, "d/f.bin", old)).status == 201
    fired = replace_after_stat(node, new)
    resp = await client.get("/v1/files/d/f.bin", headers={**auth(), "Range": wanted})
    assert fired
    assert resp.status == status, await resp.text()
    assert resp.headers["Content-Range"] == content_range
    if body is not None:
        assert await resp.read() == new[body]
        assert resp.headers["X-CallFS-Size"] == str(len(new))


async def test_a_read_that_loses_to_every_replace_is_503_while_the_file_exists(
    client: Client, node: Node
) -> None:
    """A storm of replaces reclaims each version between the reader's lookup and its open: after
    its retries the reader answers 503 (the file exists; try again), never 404. Once the file
    is deleted during the storm, 404 is the truth."""
    assert (await put(client, "d/f.bin", OLD)).status == 201
    engine = node.engine
    assert engine is not None
    real_open = engine._open
    opens: list[int] = []
    delete_at: list[int] = []

    async def open_after_a_replace(entry: Any, offset: int, length: int | None) -> Any:
        opens.append(1)

        async def body() -> Any:
            yield NEW

        if len(opens) == (delete_at[0] if delete_at else 0):
            await engine.delete(Identity("alice"), parse_body_path(entry.path), recursive=False)
        else:
            await engine.put_file(Identity("alice"), parse_body_path(entry.path), body())
        return await real_open(entry, offset, length)

    engine._open = open_after_a_replace  # type: ignore[method-assign]
    resp = await client.get("/v1/files/d/f.bin", headers=auth())
    assert resp.status == 503, await resp.text()
    assert (await resp.json())["code"] == "UNAVAILABLE"
    assert len(opens) > 1

    opens.clear()
    delete_at.append(2)  # the second open finds the file deleted
    resp = await client.get("/v1/files/d/f.bin", headers=auth())
    assert resp.status == 404, await resp.text()
    assert await unreferenced_files(node) == []


async def test_directory_creates_and_deletes_wait_for_their_dir_lock(
    short_lock_timeout: None, client: Client, node: Node
) -> None:
    """API.md §14: ``dir:<engine path>`` for a directory create and delete (a held lock: wait
    ``dlm.lock_timeout``, then 503); files keep their ``file:`` keys."""
    assert (await client.post("/v1/files/held/", headers=auth())).status == 201
    assert (await put(client, "held-file", b"x")).status == 201
    engine = node.engine
    assert engine is not None
    async with engine._locks.hold("dir:/new", 5.0), engine._locks.hold("dir:/held", 5.0):
        started = time.monotonic()
        resp = await client.post("/v1/files/new/", headers=auth())
        assert resp.status == 503, await resp.text()
        assert time.monotonic() - started >= 0.9
        assert (await client.delete("/v1/files/held", headers=auth())).status == 503
        assert (await client.delete("/v1/files/held-file", headers=auth())).status == 204
    assert (await client.post("/v1/files/new/", headers=auth())).status == 201
    assert (await client.delete("/v1/files/held", headers=auth())).status == 204


async def test_a_write_that_times_out_on_the_lock_removes_its_new_blob(
    short_lock_timeout: None, client: Client, node: Node
) -> None:
    """A PUT or POST whose commit never got the path's lock (503) left its staged blob for the
    orphan sweep (found by review); a lock timeout is a definite refusal: removed at once."""
    engine = node.engine
    assert engine is not None
    blobs = Path(node.cfg.backend.localfs_root_path) / ".callfs" / "blobs"
    assert (await put(client, "locked", b"v1")).status == 201
    before = sorted(p for p in blobs.rglob("*") if p.is_file())
    async with engine._locks.hold("file:/locked", 5.0), engine._locks.hold("file:/new", 5.0):
        assert (await put(client, "locked", b"v2")).status == 503
        resp = await client.post("/v1/files/new", data=b"n", headers=auth())
        assert resp.status == 503
    assert sorted(p for p in blobs.rglob("*") if p.is_file()) == before
    assert await (await client.get("/v1/files/locked", headers=auth())).read() == b"v1"
