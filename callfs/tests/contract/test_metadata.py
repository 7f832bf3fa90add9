"""The MetadataStore contract: every store (sqlite, postgres, redis) passes every test here."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from callfs.errors import (
    AlreadyExists,
    BadRequest,
    DirectoryNotEmpty,
    NotFound,
    ParentMissing,
    ParentNotDirectory,
    PermissionDenied,
    VersionConflict,
)
from callfs.metadata.base import MetadataStore
from callfs.model import (
    BackendType,
    Entry,
    EntryType,
    ErasureLayout,
    Link,
    LinkStatus,
    NewParents,
    Placement,
    ShardInfo,
)
from callfs.tests.contract.factories import StoreHandle


def entry(path: str, kind: str = "f", owner: str = "alice", size: int = 1) -> Entry:
    return Entry(
        path=path,
        type=EntryType.DIRECTORY if kind == "d" else EntryType.FILE,
        size=0 if kind == "d" else size,
        owner=owner,
        mtime=1_700_000_000,
        backend_type=BackendType.LOCALFS,
        instance_id="node-1",
        created_at=1_700_000_000,
    )


async def tree(store: MetadataStore, *paths: str) -> None:
    """Create paths (``x/`` = directory) with their parents, parents first."""
    made: set[str] = {"/"}
    for raw in paths:
        is_dir = raw.endswith("/")
        path = raw.rstrip("/")
        parts = path.strip("/").split("/")
        for i in range(1, len(parts)):
            parent = "/" + "/".join(parts[:i])
            if parent not in made:
                await store.create(entry(parent, "d"))
                made.add(parent)
        if path not in made:
            await store.create(entry(path, "d" if is_dir else "f"))
            made.add(path)


@pytest.fixture
def store(store_handle: StoreHandle) -> MetadataStore:
    return store_handle.store


async def test_root_exists(store: MetadataStore, store_handle: StoreHandle) -> None:
    root = await store.get("/")
    assert root is not None
    assert root.is_dir and root.owner == "root" and root.instance_id is None
    again = await store_handle.reopen()
    assert await again.get("/") == root


async def test_create_get_round_trip(store: MetadataStore) -> None:
    e = Entry(
        path="/dir",
        type=EntryType.DIRECTORY,
        size=0,
        owner="bob",
        mtime=1_700_000_123,
        backend_type=BackendType.S3,
        instance_id=None,
        created_at=1_700_000_100,
    )
    stored = await store.create(e)
    assert stored.version == 1
    assert await store.get("/dir") == stored
    f = Entry(
        path="/dir/é x%_.txt",
        type=EntryType.FILE,
        size=12345678901,
        owner="bob",
        mtime=5,
        backend_type=BackendType.ERASURE,
        instance_id="node-9",
        created_at=4,
        erasure_coded=True,
    )
    assert await store.create(f) == f
    got = await store.get("/dir/é x%_.txt")
    assert got == f
    assert (got.size, got.backend_type, got.instance_id, got.erasure_coded) == (
        12345678901,
        BackendType.ERASURE,
        "node-9",
        True,
    )
    # The store sets version 1 whatever the caller passed.
    assert (await store.create(replace(entry("/v"), version=7))).version == 1
    got_v = await store.get("/v")
    assert got_v is not None and got_v.version == 1
    assert await store.get("/missing") is None


async def test_create_if_absent_race(store: MetadataStore) -> None:
    results = await asyncio.gather(
        *(store.create(entry("/race", owner=f"u{i}")) for i in range(20)), return_exceptions=True
    )
    wins = [r for r in results if isinstance(r, Entry)]
    assert len(wins) == 1
    assert all(isinstance(r, AlreadyExists) for r in results if not isinstance(r, Entry))
    stored = await store.get("/race")
    assert stored is not None and stored.owner == wins[0].owner


async def test_update_with_versions(store: MetadataStore) -> None:
    first = await store.create(entry("/f"))
    second = await store.update(entry("/f", size=99), expected_version=first.version)
    assert second.version == first.version + 1
    got = await store.get("/f")
    assert got is not None and got.size == 99 and got.version == second.version
    with pytest.raises(VersionConflict):
        await store.update(entry("/f", size=1), expected_version=first.version)
    with pytest.raises(NotFound):
        await store.update(entry("/nope"), expected_version=1)
    results = await asyncio.gather(
        *(store.update(entry("/f", size=i), second.version) for i in range(10)),
        return_exceptions=True,
    )
    assert sum(isinstance(r, Entry) for r in results) == 1


async def test_delete(store: MetadataStore) -> None:
    e = await store.create(entry("/f"))
    with pytest.raises(VersionConflict):
        await store.delete("/f", expected_version=e.version + 5)
    await store.delete("/f", expected_version=e.version)
    assert await store.get("/f") is None
    with pytest.raises(NotFound):
        await store.delete("/f")
    with pytest.raises(PermissionDenied):
        await store.delete("/")


async def test_children_order_and_isolation(store: MetadataStore) -> None:
    await tree(
        store,
        "/d/zeta",
        "/d/Alpha",
        "/d/é",
        "/d/b_dir/",
        "/d/a%dir/",
        "/d/.hidden",
        "/d/with space",
        "/d/b_dir/grandchild",
        "/da",
        "/d0",
    )
    names = [e.name for e in await store.list_children("/d")]
    assert names == [".hidden", "Alpha", "with space", "zeta", "é", "a%dir", "b_dir"]
    assert [e.path for e in await store.list_children("/")] == ["/d0", "/da", "/d"]
    assert await store.list_children("/missing") == []
    assert await store.has_children("/d")
    assert not await store.has_children("/d/zeta")
    assert not await store.has_children("/missing")


F, D = EntryType.FILE, EntryType.DIRECTORY


async def pages_of(store: MetadataStore, path: str, limit: int) -> list[list[str]]:
    """Page through ``path`` with ``list_children_page``, each page's position past its last."""
    pages: list[list[str]] = []
    after: tuple[EntryType, str] | None = None
    while True:
        page = await store.list_children_page(path, after, limit)
        assert len(page) <= limit
        if page:
            pages.append([e.name for e in page])
            after = (page[-1].type, page[-1].name)
        if len(page) < limit:
            return pages


async def test_children_pages_order_across_the_type_boundary(store: MetadataStore) -> None:
    # Directory names below file names, a file named like a directory's prefix, and names past
    # the BMP, so that neither the type nor the UTF-8/code-point order can be faked by sorting.
    await tree(
        store,
        "/p/zeta",
        "/p/Alpha",
        "/p/é",
        "/p/\U0001f600",
        "/p/\uffff",
        "/p/a b",
        "/p/a/",
        "/p/A/",
        "/p/\u00e9dir/",
        "/p/zz/",
        "/p/a/inner",
        "/q/other",
    )
    whole = [e.name for e in await store.list_children("/p")]
    assert whole == ["Alpha", "a b", "zeta", "é", "\uffff", "\U0001f600", "A", "a", "zz", "édir"]
    for limit in (1, 2, 3, 5, 6, 7, 9, 10, 11, 100):
        pages = await pages_of(store, "/p", limit)
        assert [n for p in pages for n in p] == whole, limit
        assert all(len(p) == limit for p in pages[:-1])
    first = await store.list_children_page("/p", None, 6)
    assert [e.path for e in first] == ["/p/" + n for n in whole[:6]]
    assert first == (await store.list_children("/p"))[:6]  # whole entries, not only names
    # Positions need not name an existing child; a file position precedes every directory.

    def names(page: list[Entry]) -> list[str]:
        return [e.name for e in page]

    assert names(await store.list_children_page("/p", (F, "b"), 3)) == ["zeta", "é", "\uffff"]
    assert names(await store.list_children_page("/p", (F, "\U0010ffff"), 3)) == ["A", "a", "zz"]
    assert names(await store.list_children_page("/p", (D, "B"), 10)) == ["a", "zz", "édir"]
    assert names(await store.list_children_page("/p", (D, ""), 1)) == ["A"]
    assert names(await store.list_children_page("/p", (F, ""), 1)) == ["Alpha"]
    # Past the end, in an empty directory, below a file, for a missing path.
    assert await store.list_children_page("/p", (D, "édir"), 5) == []
    assert await store.list_children_page("/p", (D, "\U0010ffff"), 5) == []
    assert await store.list_children_page("/p/A", None, 5) == []
    assert await store.list_children_page("/p/zeta", None, 5) == []
    assert await store.list_children_page("/missing", None, 5) == []
    assert await store.count_children("/p") == 10
    assert await store.count_children("/p/a") == 1
    assert await store.count_children("/p/A") == 0
    assert await store.count_children("/missing") == 0


async def test_children_pages_of_the_root_and_exact_boundaries(store: MetadataStore) -> None:
    assert await store.list_children_page("/", None, 3) == []  # "/" never lists itself
    assert await store.count_children("/") == 0
    await asyncio.gather(*(store.create(entry(f"/f{i:03d}")) for i in range(30)))
    await asyncio.gather(*(store.create(entry(f"/d{i:03d}", "d")) for i in range(20)))
    want = [f"f{i:03d}" for i in range(30)] + [f"d{i:03d}" for i in range(20)]
    assert await store.count_children("/") == 50
    for limit in (10, 25, 30, 50):  # pages that end exactly on the type boundary and the end
        pages = await pages_of(store, "/", limit)
        assert [n for p in pages for n in p] == want
        assert len(pages) == 50 // limit + (1 if 50 % limit else 0)
    last = await store.list_children_page("/", (F, "f029"), 20)
    assert [e.name for e in last] == want[30:]
    assert await store.list_children_page("/", (D, "d019"), 1) == []
    # Entries changing between pages: one deleted behind the position, one added ahead of it.
    before = await store.list_children_page("/", None, 15)
    await store.delete("/f003")
    await store.create(entry("/f0295"))
    rest = await store.list_children_page("/", (before[-1].type, before[-1].name), 100)
    assert [e.name for e in rest][:16] == [f"f{i:03d}" for i in range(15, 30)] + ["f0295"]


async def test_list_tree(store: MetadataStore) -> None:
    await tree(store, "/a/b/c/deep.txt", "/a/top.txt", "/a/b/x.txt", "/a/a/", "/ab/no.txt")
    paths = [e.path for e in await store.list_tree("/a", 1)]
    assert paths == ["/a/top.txt", "/a/a", "/a/b", "/a/b/x.txt", "/a/b/c"]
    assert [e.path for e in await store.list_tree("/a", 0)] == ["/a/top.txt", "/a/a", "/a/b"]
    full = [e.path for e in await store.list_tree("/a", 100)]
    assert full == ["/a/top.txt", "/a/a", "/a/b", "/a/b/x.txt", "/a/b/c", "/a/b/c/deep.txt"]
    everything = [e.path for e in await store.list_tree("/", 100)]
    assert everything[:3] == ["/a", "/ab", "/a/top.txt"]
    assert len(everything) == 9


async def test_list_tree_large(store: MetadataStore) -> None:
    await store.create(entry("/big", "d"))
    for d in range(20):
        await store.create(entry(f"/big/d{d:02d}", "d"))
    await asyncio.gather(
        *(store.create(entry(f"/big/d{d:02d}/f{i:03d}")) for d in range(20) for i in range(100))
    )
    listing = await store.list_tree("/big", 100)
    assert len(listing) == 2020
    assert [e.path for e in listing[:21]] == [f"/big/d{d:02d}" for d in range(20)] + [
        "/big/d00/f000"
    ]
    assert len(await store.list_children("/big/d07")) == 100


async def test_delete_tree(store: MetadataStore) -> None:
    await tree(store, "/t/a/1", "/t/a/b/2", "/t/c", "/tz")
    top = await store.get("/t")
    assert top is not None
    removed = await store.delete_tree("/t")
    paths = [e.path for e in removed]
    assert sorted(paths) == ["/t", "/t/a", "/t/a/1", "/t/a/b", "/t/a/b/2", "/t/c"]
    depth = [p.count("/") for p in paths]
    assert depth == sorted(depth, reverse=True)
    assert await store.get("/t") is None
    assert await store.get("/tz") is not None
    assert await store.list_children("/t") == []
    with pytest.raises(NotFound):
        await store.delete_tree("/t")
    # the root's tree: everything below goes, the root stays
    await tree(store, "/r/x")
    removed = await store.delete_tree("/")
    assert sorted(e.path for e in removed) == ["/r", "/r/x", "/tz"]
    assert await store.get("/") is not None
    assert await store.list_children("/") == []


async def test_delete_tree_decides_permission_inside_the_command(store: MetadataStore) -> None:
    await tree(store, "/p/a", "/p/b/")
    await store.create(entry("/p/b/bob.txt", owner="bob"))
    with pytest.raises(PermissionDenied):
        await store.delete_tree("/p", actor="alice")
    assert await store.get("/p/a") is not None  # all or nothing
    top = await store.get("/p")
    assert top is not None
    with pytest.raises(VersionConflict):
        await store.delete_tree("/p", expected_version=top.version + 5)
    await store.delete("/p/b/bob.txt")
    assert len(await store.delete_tree("/p", expected_version=top.version, actor="alice")) == 3


async def test_create_with_parents(store: MetadataStore) -> None:
    parents = NewParents("carol", 42, BackendType.LOCALFS, "node-2")
    made = await store.create(entry("/n1/n2/n3/f.txt"), parents)
    assert made.version == 1
    for path in ("/n1", "/n1/n2", "/n1/n2/n3"):
        got = await store.get(path)
        assert got is not None and got.is_dir and got.owner == "carol" and got.mtime == 42
        assert got.instance_id == "node-2" and got.version == 1
    with pytest.raises(NotFound):
        await store.create(entry("/nope/f.txt"))  # no parents spec: the parent must exist
    assert await store.get("/nope") is None
    with pytest.raises(ParentNotDirectory):
        await store.create(entry("/n1/n2/n3/f.txt/under"), parents)
    with pytest.raises(AlreadyExists):
        await store.create(entry("/n1/n2", "d"), parents)
    # concurrent creates that share missing parents: every one succeeds, parents made once
    results = await asyncio.gather(
        *(store.create(entry(f"/m/x/{i}.txt"), parents) for i in range(10)),
        return_exceptions=True,
    )
    assert all(isinstance(r, Entry) for r in results), results
    assert len(await store.list_children("/m/x")) == 10
    assert [e.path for e in await store.list_children("/m")] == ["/m/x"]


async def test_delete_is_conditional(store: MetadataStore) -> None:
    await tree(store, "/dd/f")
    with pytest.raises(DirectoryNotEmpty):
        await store.delete("/dd")
    current = await store.get("/dd/f")
    assert current is not None
    with pytest.raises(VersionConflict):
        await store.delete("/dd/f", expected_version=current.version + 1)
    removed = await store.delete("/dd/f", expected_version=current.version)
    assert removed == current
    assert (await store.delete("/dd")).path == "/dd"
    with pytest.raises(PermissionDenied):
        await store.delete("/")


async def test_move(store: MetadataStore) -> None:
    await tree(store, "/src/a/1.txt", "/src/b.txt", "/srcx/keep.txt", "/dst/")
    before = await store.get("/src/a/1.txt")
    before_root = await store.get("/src")
    assert before is not None and before_root is not None
    moved_top, replaced = await store.move(
        "/src", "/dst/moved", expected_version=before_root.version
    )
    assert replaced is None and moved_top.path == "/dst/moved"
    assert await store.get("/src") is None
    assert await store.get("/src/a/1.txt") is None
    assert await store.get("/src/a") is None
    moved = await store.get("/dst/moved/a/1.txt")
    moved_root = await store.get("/dst/moved")
    assert moved is not None and moved_root is not None
    # Every field but the path stays; the version is bumped (a conditional write on the old
    # version must not apply to the moved entry).
    assert moved.version > before.version and moved_root.version > before_root.version
    assert replace(moved, version=before.version) == replace(before, path="/dst/moved/a/1.txt")
    assert moved_root.is_dir and moved_root.owner == before_root.owner
    assert [e.path for e in await store.list_children("/dst/moved/a")] == ["/dst/moved/a/1.txt"]
    assert [e.name for e in await store.list_children("/dst/moved")] == ["b.txt", "a"]
    assert [e.path for e in await store.list_children("/dst")] == ["/dst/moved"]
    assert await store.get("/srcx/keep.txt") is not None
    assert [e.name for e in await store.list_children("/")] == ["dst", "srcx"]
    with pytest.raises(NotFound):
        await store.move("/nope", "/x", expected_version=1)
    other = await store.create(entry("/other"))
    with pytest.raises(AlreadyExists):
        await store.move("/other", "/dst/moved", expected_version=other.version)
    with pytest.raises(VersionConflict):
        await store.move("/other", "/renamed", expected_version=other.version + 1)
    with pytest.raises(ParentMissing):
        await store.move("/other", "/no/such/parent", expected_version=other.version)
    await store.move("/other", "/renamed", expected_version=other.version)
    assert await store.get("/renamed") is not None


async def test_move_with_overwrite_parents_and_placement(store: MetadataStore) -> None:
    await tree(store, "/o/a.txt", "/o/b.txt", "/o/d1/", "/o/d2/x")
    a, b = await store.get("/o/a.txt"), await store.get("/o/b.txt")
    assert a is not None and b is not None
    with pytest.raises(VersionConflict):  # the occupant changed since it was authorised
        await store.move("/o/a.txt", "/o/b.txt", expected_version=a.version, dst_expected=9)
    moved, occupant = await store.move(
        "/o/a.txt", "/o/b.txt", expected_version=a.version, dst_expected=b.version
    )
    assert occupant == b and moved.path == "/o/b.txt" and moved.size == a.size
    assert await store.get("/o/a.txt") is None
    d1, d2 = await store.get("/o/d1"), await store.get("/o/d2")
    assert d1 is not None and d2 is not None
    with pytest.raises(DirectoryNotEmpty):
        await store.move("/o/d1", "/o/d2", expected_version=d1.version, dst_expected=d2.version)
    with pytest.raises(AlreadyExists):  # type mismatch
        await store.move("/o/d1", "/o/b.txt", expected_version=d1.version, dst_expected=2)
    parents = NewParents("alice", 7, BackendType.LOCALFS, None)
    moved, _ = await store.move(
        "/o/d1", "/deep/er/d1", expected_version=d1.version, parents=parents
    )
    deep = await store.get("/deep/er")
    assert deep is not None and deep.is_dir and deep.mtime == 7
    f = await store.get("/o/b.txt")
    assert f is not None
    place = Placement(BackendType.S3, None, "b" * 32, 77)
    switched, _ = await store.move(
        "/o/b.txt", "/o/b.txt", expected_version=f.version, placement=place
    )
    got = await store.get("/o/b.txt")
    assert got == switched
    assert (got.backend_type, got.instance_id, got.blob_key, got.size) == (
        BackendType.S3,
        None,
        "b" * 32,
        77,
    )
    assert got.version == f.version + 1


async def test_directory_placement_switch_retags_only_the_directory(store: MetadataStore) -> None:
    """A drain re-tags a node's directories: in place, owner node and backend only (a directory
    names no blob), version bumped, its subtree untouched; anything else is refused."""
    await tree(store, "/g/d/x.txt", "/g/e/")
    d, x = await store.get("/g/d"), await store.get("/g/d/x.txt")
    assert d is not None and x is not None
    retag = Placement(BackendType.LOCALFS, "node-2", None, 0)
    with pytest.raises(VersionConflict):
        await store.move("/g/d", "/g/d", expected_version=d.version + 1, placement=retag)
    with pytest.raises(BadRequest):  # a directory names no blob
        await store.move(
            "/g/d", "/g/d", expected_version=d.version, placement=replace(retag, blob_key="k" * 32)
        )
    with pytest.raises(BadRequest):  # only in place
        await store.move("/g/d", "/g/d2", expected_version=d.version, placement=retag)
    with pytest.raises(BadRequest):  # a file's placement names a blob
        await store.move("/g/d/x.txt", "/g/d/x.txt", expected_version=x.version, placement=retag)
    switched, occupant = await store.move(
        "/g/d", "/g/d", expected_version=d.version, placement=retag
    )
    assert occupant is None
    assert switched == replace(d, instance_id="node-2", version=d.version + 1)
    assert await store.get("/g/d") == switched
    assert await store.get("/g/d/x.txt") == x  # nothing below it changes
    assert [e.path for e in await store.list_children("/g")] == ["/g/d", "/g/e"]
    assert [e.path for e in await store.list_children("/g/d")] == ["/g/d/x.txt"]


async def test_blobs_referenced(store: MetadataStore) -> None:
    await store.create(replace(entry("/b1"), blob_key="1" * 32))
    await store.create(replace(entry("/b2"), blob_key="2" * 32))
    assert await store.blobs_referenced(["1" * 32, "2" * 32, "3" * 32]) == {"1" * 32, "2" * 32}
    b2 = await store.get("/b2")
    assert b2 is not None
    await store.update(replace(b2, blob_key="4" * 32), b2.version)
    await store.move("/b1", "/b1-renamed", expected_version=1)
    await store.delete("/b1-renamed")
    assert await store.blobs_referenced(["1" * 32, "2" * 32, "4" * 32]) == {"4" * 32}
    assert await store.blobs_referenced([]) == set()


def link(token: str, status: LinkStatus = LinkStatus.ACTIVE, **kw: float) -> Link:
    return Link(
        token=token,
        path="/f.txt",
        status=status,
        expires_at=kw.get("expires_at", 2_000_000_000.0),
        created_at=1_700_000_000.5,
        signature="sig=",
        used_at=kw.get("used_at"),
        used_by_ip="10.0.0.1" if "used_at" in kw else None,
    )


async def test_links(store: MetadataStore) -> None:
    await store.create_link(link("tok-1"))
    with pytest.raises(AlreadyExists):
        await store.create_link(link("tok-1", LinkStatus.USED, used_at=5.0))
    got = await store.get_link("tok-1")
    assert got == link("tok-1")
    assert await store.get_link("nope") is None
    results = await asyncio.gather(
        *(store.consume_link("tok-1", 1_800_000_000.25, f"10.0.0.{i}") for i in range(50))
    )
    assert results.count(True) == 1
    used = await store.get_link("tok-1")
    assert used is not None and used.status is LinkStatus.USED
    assert used.used_at == 1_800_000_000.25 and used.used_by_ip is not None
    assert await store.consume_link("missing", 1.0, "x") is False


async def test_sweep_links(store: MetadataStore) -> None:
    now = 1_800_000_000.0
    await store.create_link(link("expired", expires_at=now - 1))
    await store.create_link(link("fresh", expires_at=now + 100))
    await store.create_link(link("old-used", LinkStatus.USED, used_at=now - 90_000))
    await store.create_link(link("new-used", LinkStatus.USED, used_at=now - 10))
    removed = await store.sweep_links(now, now - 86_400)
    assert removed == 2
    assert await store.get_link("expired") is None
    assert await store.get_link("old-used") is None
    assert await store.get_link("fresh") is not None
    assert await store.get_link("new-used") is not None


async def test_erasure_layouts(store: MetadataStore) -> None:
    layout = ErasureLayout(
        file_path="/e.bin",
        original_size=1000,
        data_shards=2,
        parity_shards=1,
        shard_size=500,
        upload_id="0" * 32,
        shards=tuple(
            ShardInfo(i, f"node-{i}", "localfs", f".erasure/{'0' * 32}/{i}", 500, "ab" * 32)
            for i in range(3)
        ),
    )
    await store.put_erasure(layout)
    assert await store.get_erasure("/e.bin") == layout
    replaced = ErasureLayout("/e.bin", 5, 1, 1, 5, "1" * 32, ())
    await store.put_erasure(replaced)
    assert await store.get_erasure("/e.bin") == replaced
    await store.delete_erasure("/e.bin")
    await store.delete_erasure("/e.bin")
    assert await store.get_erasure("/e.bin") is None


async def test_persistence(store_handle: StoreHandle) -> None:
    await tree(store_handle.store, "/keep/me.txt")
    await store_handle.store.create_link(link("persisted"))
    store = await store_handle.reopen()
    assert await store.get("/keep/me.txt") is not None
    assert [e.path for e in await store.list_children("/keep")] == ["/keep/me.txt"]
    assert await store.get_link("persisted") is not None


# ---- SQLite only: group commit, start-up and shutdown behaviour ---------------------------------


async def test_sqlite_group_commit(tmp_path: Path) -> None:
    """Concurrent writes share transactions (one fsync for many), and one op's failure inside a
    shared transaction reaches only its own caller."""
    import sqlite3

    from callfs.errors import InternalError, Unavailable
    from callfs.metadata.sqlite import SqliteMetadataStore

    store = SqliteMetadataStore(str(tmp_path / "nested" / "dir" / "meta.sqlite3"))
    batches: list[int] = []
    apply = store._apply_batch

    def counting(conn: sqlite3.Connection, batch: list[Any]) -> None:
        batches.append(len(batch))
        apply(conn, batch)

    store._apply_batch = counting  # type: ignore[method-assign]
    await store.start()
    try:
        assert (tmp_path / "nested" / "dir" / "meta.sqlite3").exists()
        await asyncio.gather(*(store.create(entry(f"/g{i}")) for i in range(200)))
        assert sum(batches) == 200
        assert len(batches) < 100, batches
        assert len(await store.list_children("/")) == 200

        def broken(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO entries (path) VALUES ('/half')")  # NOT NULL violations
            conn.execute("SELECT * FROM no_such_table")

        def disk_error(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO links (token, path, status, expires_at, created_at,"
                " signature) VALUES ('t', '/p', 'active', 1, 1, 's')"
            )
            raise sqlite3.OperationalError("disk I/O error")

        batches.clear()
        results = await asyncio.gather(
            store.create(entry("/before")),
            store._write(broken),
            store._write(disk_error),
            store.create(entry("/g1")),
            store.create(entry("/after")),
            return_exceptions=True,
        )
        assert isinstance(results[0], Entry) and isinstance(results[4], Entry)
        assert isinstance(results[1], InternalError)  # a NOT NULL bug is no 409
        assert isinstance(results[2], Unavailable)
        assert isinstance(results[3], AlreadyExists)
        assert not any(isinstance(r, sqlite3.Error) for r in results)
        assert await store.get("/before") is not None and await store.get("/after") is not None
        assert await store.get_link("t") is None  # the failed op's own change was undone
    finally:
        await store.close()


async def test_sqlite_closed_and_unopenable(tmp_path: Path) -> None:
    from callfs.errors import Unavailable
    from callfs.metadata.sqlite import SqliteMetadataStore

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(Unavailable):
        await SqliteMetadataStore(str(blocker / "meta.sqlite3")).start()
    garbage = tmp_path / "garbage.sqlite3"
    garbage.write_bytes(b"this is not an sqlite database" * 100)
    with pytest.raises(Unavailable):
        await SqliteMetadataStore(str(garbage)).start()

    store = SqliteMetadataStore(str(tmp_path / "ok.sqlite3"))
    await store.start()
    pending = [asyncio.ensure_future(store.create(entry(f"/c{i}"))) for i in range(20)]
    await asyncio.sleep(0)
    await store.close()
    # Writes queued before close() are applied; writes after it fail at once, never hang.
    assert all(isinstance(r, Entry) for r in await asyncio.gather(*pending))
    with pytest.raises(Unavailable):
        await asyncio.wait_for(store.create(entry("/late")), 5)
    again = SqliteMetadataStore(str(tmp_path / "ok.sqlite3"))
    await again.start()
    try:
        assert len(await again.list_children("/")) == 20
    finally:
        await again.close()


async def test_sqlite_a_write_its_caller_gave_up_on_before_it_ran_is_not_applied(
    tmp_path: Path,
) -> None:
    """Another process holds the database (a CLI, a worker process): a create waits, its caller
    times out (503 for the client), and the create must not land later behind its back (a
    retried POST then met 409 for its own first try)."""
    import sqlite3

    from callfs.metadata.sqlite import SqliteMetadataStore

    db = tmp_path / "meta.sqlite3"
    store = SqliteMetadataStore(str(db))
    await store.start()
    other = sqlite3.connect(db, isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(store.create(entry("/late")), 0.3)
        other.execute("COMMIT")
        await store.create(entry("/next"))  # the writer has moved past the abandoned one
        assert await store.get("/next") is not None
        assert await store.get("/late") is None
    finally:
        other.close()
        await store.close()
