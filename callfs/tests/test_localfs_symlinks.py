"""localfs never serves, stats or deletes bytes outside its root, even when a directory inside the
root is swapped for a symlink after it was read through (docs/security.md, threat model).

Each case reads the key once (so any memo of verified directories is warm), replaces one directory
on the way to the key with a symlink to a look-alike tree outside the root, then reads, stats and
deletes again: never the outside bytes, and the outside file is left as it was.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from callfs.errors import NotFound, UnsafePath
from callfs.storage import localfs
from callfs.storage.base import new_blob_key, publish_or_discard
from callfs.storage.localfs import LocalFSBackend

INSIDE = b"inside bytes"
OUTSIDE = b"OUTSIDE BYTES - must never be served"
#: A body over one write batch: ``stage`` writes it to ``.callfs/tmp`` (a smaller one is held
#: in memory and written by ``publish``).
STAGED = INSIDE * 100_000


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def _write(backend: LocalFSBackend, key: str, data: bytes) -> None:
    staged = await backend.stage(key, _chunks(data))
    await staged.publish()


async def _read(backend: LocalFSBackend, key: str, length: int | None = None) -> bytes:
    stream = await backend.open_read(key, 0, length)
    try:
        return b"".join([c async for c in stream])
    finally:
        await stream.aclose()


@pytest.fixture(params=["openat2", "walk"])
async def backend(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[LocalFSBackend]:
    """Reads open in one ``openat2(RESOLVE_NO_SYMLINKS)`` where the kernel has it, else walk the
    path one component at a time: every case runs both ways."""
    if request.param == "walk":
        monkeypatch.setattr(localfs, "_OPEN_NO_SYMLINKS", None)
    b = LocalFSBackend(str(tmp_path / "root"))
    await b.start()
    yield b
    await b.close()


def _swap_for_symlink(root: Path, rel_dir: str, rel_file: str, outside: Path) -> Path:
    """Move ``root/rel_dir`` away (still inside the root) and put a symlink to ``outside`` in its
    place; ``outside`` gets a file at the same relative position as ``rel_file`` had below it."""
    victim = root / rel_dir
    os.rename(victim, root / f"moved-away-{os.urandom(4).hex()}")
    below = Path(rel_file).relative_to(rel_dir)
    planted = outside / below
    planted.parent.mkdir(parents=True, exist_ok=True)
    planted.write_bytes(OUTSIDE)
    victim.symlink_to(outside, target_is_directory=True)
    return planted


async def _assert_refused(backend: LocalFSBackend, key: str, planted: Path) -> None:
    for length in (None, 5, len(OUTSIDE)):  # the inline small read and the threaded read
        try:
            got = await _read(backend, key, length)
        except (NotFound, UnsafePath):
            continue
        raise AssertionError(f"read through a swapped-in symlink returned {got!r}")
    try:
        st = await backend.stat(key)
    except UnsafePath:
        st = None
    assert st is None or st.size != len(OUTSIDE), "stat followed the swapped-in symlink"
    with pytest.raises((NotFound, UnsafePath)):
        await backend.delete(key)
    assert planted.read_bytes() == OUTSIDE, "delete removed or changed a file outside the root"


@pytest.mark.parametrize("swapped", ["old", "old/dir"])
async def test_legacy_key_parent_swapped_for_symlink(
    backend: LocalFSBackend, tmp_path: Path, swapped: str
) -> None:
    key = "old/dir/file.txt"
    await _write(backend, key, INSIDE)
    assert await _read(backend, key) == INSIDE
    assert await _read(backend, key, 5) == INSIDE[:5]
    planted = _swap_for_symlink(tmp_path / "root", swapped, key, tmp_path / "outside")
    await _assert_refused(backend, key, planted)


@pytest.mark.parametrize("depth", [0, 1, 2, 3])
@pytest.mark.parametrize("area", ["blobs", "replica"])
async def test_blob_fanout_swapped_for_symlink(
    backend: LocalFSBackend, tmp_path: Path, depth: int, area: str
) -> None:
    blob = new_blob_key()
    key = blob if area == "blobs" else f"r/{blob}"
    await _write(backend, key, INSIDE)
    assert await _read(backend, key) == INSIDE
    assert await _read(backend, key, 5) == INSIDE[:5]
    parts = [".callfs", area, blob[:2], blob[2:4]]
    rel_file = "/".join([*parts, blob])
    planted = _swap_for_symlink(
        tmp_path / "root", "/".join(parts[: depth + 1]), rel_file, tmp_path / "outside"
    )
    await _assert_refused(backend, key, planted)


async def test_last_component_symlink_is_refused(backend: LocalFSBackend, tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_bytes(OUTSIDE)
    (tmp_path / "root" / "legacy").mkdir()
    (tmp_path / "root" / "legacy" / "f.txt").symlink_to(outside)
    with pytest.raises((NotFound, UnsafePath)):
        await _read(backend, "legacy/f.txt")
    with contextlib.suppress(NotFound, UnsafePath):  # removing the link itself is allowed
        await backend.delete("legacy/f.txt")
    assert outside.read_bytes() == OUTSIDE


@pytest.mark.parametrize("key", ["a/../../x", "a/./b", "a//b", ".callfs/blobs/x", "../x"])
async def test_odd_legacy_keys_are_refused(backend: LocalFSBackend, key: str) -> None:
    with pytest.raises(UnsafePath):
        await backend.open_read(key)


# ---- the server's own directories swapped for a symlink ---------------------------------------
INTERNAL_DIRS = [".callfs", ".callfs/tmp", ".callfs/blobs", ".callfs/replica"]


def _outside_with_precious(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    for sub in ("", "tmp", "blobs", "replica"):
        (outside / sub).mkdir(parents=True, exist_ok=True)
        (outside / sub / "precious.part").write_bytes(OUTSIDE)
    return outside


def _replace_with_symlink(root: Path, rel_dir: str, outside: Path) -> None:
    victim = root / rel_dir
    if victim.exists():
        os.rename(victim, root / f"moved-away-{os.urandom(4).hex()}")
    victim.symlink_to(outside, target_is_directory=True)


@pytest.mark.parametrize("rel_dir", INTERNAL_DIRS)
async def test_start_refuses_a_symlinked_internal_directory(tmp_path: Path, rel_dir: str) -> None:
    """Start once, swap an internal directory for a symlink to outside, start again: refused,
    and nothing outside is removed or created (the start-up sweep never follows it)."""
    first = LocalFSBackend(str(tmp_path / "root"))
    await first.start()
    await first.close()
    outside = _outside_with_precious(tmp_path)
    before = sorted(p.relative_to(outside) for p in outside.rglob("*"))
    _replace_with_symlink(tmp_path / "root", rel_dir, outside)
    again = LocalFSBackend(str(tmp_path / "root"))
    with pytest.raises(UnsafePath, match="symlink"):
        await again.start()
    assert sorted(p.relative_to(outside) for p in outside.rglob("*")) == before
    assert all(p.read_bytes() == OUTSIDE for p in outside.rglob("precious.part"))


@pytest.mark.parametrize("rel_dir", [".callfs", ".callfs/tmp"])
async def test_staging_never_writes_or_sweeps_through_a_symlink(
    backend: LocalFSBackend, tmp_path: Path, rel_dir: str
) -> None:
    outside = _outside_with_precious(tmp_path)
    before = sorted(p.relative_to(outside) for p in outside.rglob("*"))
    _replace_with_symlink(tmp_path / "root", rel_dir, outside)
    with pytest.raises(UnsafePath):
        await backend.stage(new_blob_key(), _chunks(STAGED))
    with pytest.raises(UnsafePath):
        await publish_or_discard(await backend.stage(new_blob_key(), _chunks(INSIDE)))
    with pytest.raises(UnsafePath):
        await backend.sweep_temp(0.0)
    assert sorted(p.relative_to(outside) for p in outside.rglob("*")) == before
    assert all(p.read_bytes() == OUTSIDE for p in outside.rglob("precious.part"))


@pytest.mark.parametrize(
    ("then", "rel_dir"),
    [("publish", d) for d in INTERNAL_DIRS] + [("discard", ".callfs"), ("discard", ".callfs/tmp")],
)
async def test_publish_and_discard_after_a_swap_stay_inside(
    backend: LocalFSBackend, tmp_path: Path, rel_dir: str, then: str
) -> None:
    """The window between staging and publishing: a directory swapped meanwhile is refused; the
    outside holds a file under the staged file's very name, which is never moved nor removed."""
    blob = new_blob_key()
    key = f"r/{blob}" if rel_dir.endswith("replica") else blob
    staged = await backend.stage(key, _chunks(STAGED))
    (part,) = (tmp_path / "root" / ".callfs" / "tmp").iterdir()
    outside = _outside_with_precious(tmp_path)
    for sub in ("", "tmp"):
        (outside / sub / part.name).write_bytes(OUTSIDE)
    before = sorted(p.relative_to(outside) for p in outside.rglob("*"))
    _replace_with_symlink(tmp_path / "root", rel_dir, outside)
    if then == "publish":
        with pytest.raises((UnsafePath, NotFound, FileNotFoundError)):
            await staged.publish()
    else:
        await staged.discard()
    assert sorted(p.relative_to(outside) for p in outside.rglob("*")) == before
    assert all(p.read_bytes() == OUTSIDE for p in outside.rglob("*") if p.is_file())


# ---- modes: the server's files are private to its user ----------------------------------------
async def test_internal_directories_and_files_are_private(tmp_path: Path) -> None:
    old_umask = os.umask(0o022)
    try:
        b = LocalFSBackend(str(tmp_path / "root"))
        await b.start()
        blob = new_blob_key()
        await _write(b, blob, INSIDE)
        await _write(b, f"r/{blob}", INSIDE)
        staged = await b.stage(new_blob_key(), _chunks(STAGED))
        internal = tmp_path / "root" / ".callfs"
        modes = {
            str(p.relative_to(internal)): p.stat().st_mode & 0o777
            for p in [internal, *internal.rglob("*")]
        }
        await staged.discard()
        await b.close()
    finally:
        os.umask(old_umask)
    fanned = [f"{area}/{blob[:2]}" for area in ("blobs", "replica")]
    fanned += [f"{d}/{blob[2:4]}" for d in fanned]
    for rel in [".", "tmp", "blobs", "replica", *fanned]:
        assert modes.pop(rel) == 0o700, rel
    assert len(modes) == 3, modes  # the blob, its replica copy and the staged upload
    assert set(modes.values()) == {0o600}, modes


async def test_start_makes_wider_internal_directories_private(tmp_path: Path) -> None:
    """Directories an earlier version made 0755 are set back to 0700 at start."""
    internal = tmp_path / "root" / ".callfs"
    for rel in ("", "tmp", "blobs", "replica"):
        (internal / rel).mkdir(parents=True, exist_ok=True)
        (internal / rel).chmod(0o755)
    b = LocalFSBackend(str(tmp_path / "root"))
    await b.start()
    await b.close()
    for rel in ("", "tmp", "blobs", "replica"):
        assert (internal / rel).stat().st_mode & 0o777 == 0o700, rel


async def test_a_root_file_named_like_a_blob_key_is_read_at_its_path(tmp_path: Path) -> None:
    """Before blob keys, a file's bytes sat at its namespace path and the stores kept that path
    minus the slash as its key: a root file named with 32 hex digits (an MD5 name) then looked
    like a blob key and was looked for in the blob area. The SQLite/PostgreSQL migration (and
    the Redis decoder) now give legacy keys with their slash, which the backends read in place;
    the migration leaves new keys alone."""
    import sqlite3

    from callfs.metadata import sqlite_ops as ops
    from callfs.model import BackendType, Entry, EntryType

    name = "d41d8cd98f00b204e9800998ecf8427e"
    db = sqlite3.connect(tmp_path / "old.sqlite3", isolation_level=None)
    for number, ddl in enumerate(ops.MIGRATIONS[:-1], start=1):  # a database of the last version
        db.executescript(ddl)
        db.execute(f"PRAGMA user_version = {number}")
    fresh = new_blob_key()
    for path, key in ((f"/{name}", name), ("/x.txt", "x.txt"), ("/n.bin", fresh)):
        entry = Entry(path, EntryType.FILE, 6, "alice", 1, BackendType.LOCALFS, "n1", blob_key=key)
        ops.apply_plan(db, ops.plan_create(entry, None, {"/": ops.ROOT})[0])
    assert ops.migrate(db) == [len(ops.MIGRATIONS)]
    keys = dict(db.execute("SELECT path, blob_key FROM entries WHERE type = 'file'").fetchall())
    assert keys == {f"/{name}": f"/{name}", "/x.txt": "/x.txt", "/n.bin": fresh}
    db.close()

    backend = LocalFSBackend(str(tmp_path / "root"))
    await backend.start()
    try:
        (tmp_path / "root" / name).write_bytes(b"legacy")
        assert await _read(backend, f"/{name}") == b"legacy"
        assert await backend.stat(name) is None  # the same digits as a blob key: another file
        await backend.delete(f"/{name}")
        assert not (tmp_path / "root" / name).exists()
    finally:
        await backend.close()


async def test_a_fifo_under_the_root_is_refused_without_blocking(
    backend: LocalFSBackend, tmp_path: Path
) -> None:
    """Opens run on the event loop: a FIFO with no writer must not hold them (O_NONBLOCK)."""
    (tmp_path / "root" / "legacy").mkdir()
    os.mkfifo(tmp_path / "root" / "legacy" / "pipe")
    with pytest.raises(NotFound):
        await _read(backend, "legacy/pipe")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="openat2 is Linux only")
def test_reads_use_openat2_on_linux() -> None:
    """The one-call open must not switch itself off unnoticed (kernel >= 5.6 here)."""
    assert localfs._OPEN_NO_SYMLINKS is not None


async def test_an_unexpected_open_error_names_no_server_path(
    backend: LocalFSBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From a security audit: a socket planted where a blob belongs failed the open with ENXIO,
    and the OSError carried the absolute path into the log's traceback."""
    import socket

    key = new_blob_key()
    where = tmp_path / "root" / ".callfs" / "blobs" / key[:2] / key[2:4]
    where.mkdir(parents=True, exist_ok=True)
    planted = socket.socket(socket.AF_UNIX)
    try:
        monkeypatch.chdir(where)  # a socket's path is limited to 108 bytes
        planted.bind(key)
        monkeypatch.undo()
        with pytest.raises((OSError, NotFound, UnsafePath)) as info:
            await _read(backend, key)
        shown = str(info.value) + str(info.value.__cause__ or "")  # what a traceback shows
        assert str(tmp_path) not in shown, shown
    finally:
        planted.close()
