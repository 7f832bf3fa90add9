"""Local disk backend: immutable blobs under ``<root>/.callfs/`` (``docs/storage-layout.md``).

- ``<root>/.callfs/tmp/<random>.part``: writes stream here (same filesystem) and are fsync'd;
- ``<root>/.callfs/blobs/<k0k1>/<k2k3>/<key>``: ``publish`` renames the temp file here, then fsyncs
  the directory (and any fan-out directory it had to create): a crash never exposes a partial blob;
- ``<root>/.callfs/replica/...``: HA replica copies (keys ``r/<key>``), same fan-out.

Only the server names these files: client paths never map to disk paths, so no request can reach
the staging area or a blob by name. Keys that are not blob keys are legacy namespace paths (files
written before blob keys, at ``<root><engine path>``): read and deleted in place, confined to the
root with symlinks refused, and never inside ``.callfs/``.

Reads, stats and deletes reach a key from the root one component at a time (``openat`` with
``O_NOFOLLOW``), so a directory inside the root swapped for a symlink at any moment is refused,
never followed: nothing outside the root is ever served or removed.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import AsyncIterable, AsyncIterator
from typing import IO, NoReturn

from callfs.concurrency import run_blocking
from callfs.errors import InsufficientStorage, NotFound, UnsafePath
from callfs.storage.base import REPLICA_PREFIX, ObjectStat, is_blob_key, is_replica_key

log = logging.getLogger(__name__)

INTERNAL_DIR = ".callfs"
TMP_DIR = os.path.join(INTERNAL_DIR, "tmp")
BLOB_DIR = os.path.join(INTERNAL_DIR, "blobs")
REPLICA_DIR = os.path.join(INTERNAL_DIR, "replica")
#: Body bytes gathered before one write hop to a thread.
WRITE_BATCH = 1 << 20
#: Reads up to this size are done in the same thread hop as the open and answered inline.
SMALL_READ = 64 * 1024
READ_CHUNK = 1024 * 1024
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalFileStream:
    """A read of ``[offset, offset+length)`` of an open local file (``base.LocalFileStream``)."""

    def __init__(
        self, fileobj: IO[bytes], offset: int, length: int, small_body: bytes | None
    ) -> None:
        self.fileobj = fileobj
        self.offset = offset
        self.length = length
        self.small_body = small_body

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self.small_body is not None:
            if self.small_body:
                yield self.small_body
            return
        pos, end = self.offset, self.offset + self.length
        fd = self.fileobj.fileno()
        while pos < end:
            chunk = await run_blocking(os.pread, fd, min(READ_CHUNK, end - pos), pos)
            if not chunk:
                return
            pos += len(chunk)
            yield chunk

    async def aclose(self) -> None:
        if not self.fileobj.closed:
            self.fileobj.close()


class _Staged:
    def __init__(self, backend: LocalFSBackend, key: str, tmp: str, target: str, size: int) -> None:
        self._backend = backend
        self.key = key
        self._tmp = tmp
        self._target = target
        self.size = size

    async def publish(self) -> None:
        try:
            await run_blocking(self._backend._publish_blocking, self._tmp, self._target)
        except OSError as exc:
            _raise_if_no_space(exc)
            raise

    async def discard(self) -> None:
        await run_blocking(_unlink_quietly, self._tmp)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:
        log.warning("could not remove a temporary upload file", exc_info=True)


#: A write that fails with one of these found no room: ``InsufficientStorage`` (507).
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


def _raise_if_no_space(exc: OSError) -> None:
    if exc.errno in _NO_SPACE:
        raise InsufficientStorage() from exc


class LocalFSBackend:
    kind = "localfs"

    def __init__(self, root: str) -> None:
        self._configured_root = root
        self._root = ""
        self._tmp = ""
        self._blobs = ""
        self._replica = ""

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        await run_blocking(self._start_blocking)

    def _start_blocking(self) -> None:
        os.makedirs(self._configured_root, mode=0o755, exist_ok=True)
        self._root = os.path.realpath(self._configured_root)
        self._tmp = os.path.join(self._root, TMP_DIR)
        self._blobs = os.path.join(self._root, BLOB_DIR)
        self._replica = os.path.join(self._root, REPLICA_DIR)
        os.makedirs(self._tmp, mode=0o700, exist_ok=True)
        os.makedirs(self._blobs, mode=0o700, exist_ok=True)
        removed = self._sweep_temp_blocking(0.0)
        if removed:
            log.info("removed %d temporary files left by an interrupted upload", removed)

    async def close(self) -> None:
        return None

    async def sweep_temp(self, older_than: float) -> int:
        """Remove temp files older than ``older_than`` seconds (crash leftovers)."""
        return await run_blocking(self._sweep_temp_blocking, older_than)

    def _sweep_temp_blocking(self, older_than: float) -> int:
        cutoff = time.time() - older_than
        removed = 0
        with os.scandir(self._tmp) as entries:
            leftovers = list(entries)
        for entry in leftovers:
            if not entry.name.endswith(".part"):
                continue  # only what stage() creates
            try:
                if entry.stat(follow_symlinks=False).st_mtime <= cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except OSError:
                continue
        return removed

    # ---- path confinement ------------------------------------------------------------------
    def _inside(self, real: str) -> bool:
        return real == self._root or real.startswith(self._root + os.sep)

    def _locate(self, key: str) -> str:
        """Absolute location of the blob ``key``."""
        if not self._root:
            raise RuntimeError("LocalFSBackend used before start()")
        if is_blob_key(key):
            return _fanned(self._blobs, key)
        if is_replica_key(key):
            return _fanned(self._replica, key[len(REPLICA_PREFIX) :])
        return self._resolve(key)

    def _resolve(self, path: str) -> str:
        """Absolute location of a legacy key (a namespace path), for the write path. Its parent
        must resolve inside the root, checked on every call (no memo: a directory verified once
        may be a symlink by the next call). Reads, stats and deletes do not use this: they walk
        the key with ``_open_parent_blocking``."""
        rel = "/".join(_key_parts(path))
        full = os.path.join(self._root, rel)
        parent = os.path.realpath(os.path.dirname(full))
        if not self._inside(parent):
            log.error("refused a path that resolves outside the localfs root")
            raise UnsafePath()
        return os.path.join(parent, os.path.basename(full))

    def _open_parent_blocking(self, key: str) -> tuple[int, str]:
        """A descriptor of the directory holding ``key`` and the key's last component.

        The directory is reached from the root one component at a time, each opened relative to
        the previous one with ``O_NOFOLLOW | O_DIRECTORY``: a component that is (or has just
        become) a symlink is refused (``UnsafePath``), never followed, whatever was verified
        before. A missing component, or one that is not a directory, raises ``NotFound``. The
        caller closes the descriptor and opens or stats the last component relative to it,
        without following it either.
        """
        if not self._root:
            raise RuntimeError("LocalFSBackend used before start()")
        if is_blob_key(key):
            parts = [INTERNAL_DIR, "blobs", key[:2], key[2:4], key]
        elif is_replica_key(key):
            blob = key[len(REPLICA_PREFIX) :]
            parts = [INTERNAL_DIR, "replica", blob[:2], blob[2:4], blob]
        else:
            parts = _key_parts(key)
        # self._root was made a real path at start: no component of it is a symlink.
        fd = os.open(self._root, os.O_RDONLY | _O_DIRECTORY)
        try:
            for name in parts[:-1]:
                try:
                    child = os.open(name, os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW, dir_fd=fd)
                except OSError as exc:
                    _raise_for_component(exc, name, fd)
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd, parts[-1]

    # ---- writes ----------------------------------------------------------------------------
    async def stage(self, key: str, chunks: AsyncIterable[bytes]) -> _Staged:
        target = self._locate(key)
        tmp = os.path.join(self._tmp, f"{os.urandom(12).hex()}.part")
        pending: list[bytes] = []
        pending_size = 0
        size = 0
        fileobj: IO[bytes] | None = None
        try:
            async for chunk in chunks:
                if not chunk:
                    continue
                pending.append(chunk)
                pending_size += len(chunk)
                size += len(chunk)
                if pending_size >= WRITE_BATCH:
                    fileobj = await run_blocking(self._write_blocking, fileobj, tmp, pending)
                    pending = []
                    pending_size = 0
            await run_blocking(self._finish_blocking, fileobj, tmp, pending)
        except BaseException as exc:
            if fileobj is not None and not fileobj.closed:
                fileobj.close()
            await run_blocking(_unlink_quietly, tmp)
            if isinstance(exc, OSError):
                _raise_if_no_space(exc)
            raise
        return _Staged(self, key, tmp, target, size)

    @staticmethod
    def _write_blocking(fileobj: IO[bytes] | None, tmp: str, parts: list[bytes]) -> IO[bytes]:
        opened = fileobj is None
        if fileobj is None:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            fileobj = os.fdopen(fd, "wb", buffering=0)
        try:
            for part in parts:
                view = memoryview(part)
                while view:
                    written = fileobj.write(view)
                    view = view[written or 0 :]
        except BaseException:
            if opened:  # the caller never got it: close it here (a full disk fails the 1st write)
                fileobj.close()
            raise
        return fileobj

    @classmethod
    def _finish_blocking(cls, fileobj: IO[bytes] | None, tmp: str, parts: list[bytes]) -> None:
        fileobj = cls._write_blocking(fileobj, tmp, parts)
        try:
            os.fsync(fileobj.fileno())
        finally:
            fileobj.close()

    def _publish_blocking(self, tmp: str, target: str) -> None:
        parent = os.path.dirname(target)
        self._makedirs_blocking(parent)
        try:
            if stat.S_ISDIR(os.lstat(target).st_mode):
                raise UnsafePath()
        except FileNotFoundError:
            pass
        os.replace(tmp, target)
        _fsync_dir(parent)

    def _makedirs_blocking(self, full: str) -> None:
        """Create ``full`` and its missing parents, fsyncing each parent that gained an entry (a
        new fan-out directory must survive a crash as surely as the blob inside it)."""
        missing: list[str] = []
        cursor = full
        while not os.path.isdir(cursor):
            missing.append(cursor)
            cursor = os.path.dirname(cursor)
        for directory in reversed(missing):
            try:
                os.mkdir(directory, 0o755)
            except FileExistsError:
                if not os.path.isdir(directory):
                    raise UnsafePath() from None
            except NotADirectoryError as exc:
                raise UnsafePath() from exc
            _fsync_dir(os.path.dirname(directory))
        if not self._inside(os.path.realpath(full)):
            raise UnsafePath()

    # ---- reads -----------------------------------------------------------------------------
    async def open_read(
        self, key: str, offset: int = 0, length: int | None = None
    ) -> LocalFileStream:
        if length is not None and length <= SMALL_READ:
            # A small range is a short walk of cached directories + open + fstat + pread of
            # page-cached data: cheaper inline than the thread hop (bench/README.md records the
            # measurement). Large reads stay off the loop.
            return self._open_blocking(key, offset, length)
        return await run_blocking(self._open_blocking, key, offset, length)

    def _open_blocking(self, key: str, offset: int, length: int | None) -> LocalFileStream:
        parent, name = self._open_parent_blocking(key)
        try:
            fd = os.open(name, os.O_RDONLY | _O_NOFOLLOW, dir_fd=parent)
        except OSError as exc:
            _raise_for_component(exc, name, parent)
        finally:
            os.close(parent)
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise NotFound()
        fileobj = os.fdopen(fd, "rb", buffering=0)
        try:
            start = min(max(offset, 0), st.st_size)
            end = st.st_size if length is None else min(st.st_size, start + max(length, 0))
            count = end - start
            small: bytes | None = None
            if count <= SMALL_READ:
                small = os.pread(fd, count, start) if count else b""
                fileobj.close()
            return LocalFileStream(fileobj, start, count, small)
        except BaseException:
            fileobj.close()
            raise

    async def stat(self, key: str) -> ObjectStat | None:
        try:
            st = await run_blocking(self._lstat_blocking, key)
        except (NotFound, FileNotFoundError, NotADirectoryError):
            return None
        return ObjectStat(
            size=st.st_size if stat.S_ISREG(st.st_mode) else 0,
            is_dir=stat.S_ISDIR(st.st_mode),
            mtime=st.st_mtime,
        )

    def _lstat_blocking(self, key: str) -> os.stat_result:
        parent, name = self._open_parent_blocking(key)
        try:
            return os.stat(name, dir_fd=parent, follow_symlinks=False)
        finally:
            os.close(parent)

    # ---- removal ---------------------------------------------------------------------------
    async def delete(self, key: str) -> None:
        await run_blocking(self._delete_blocking, key)

    def _delete_blocking(self, key: str) -> None:
        """Unlink the key inside the directory reached by the walk (a symlink there is removed
        itself, never followed), then fsync that directory."""
        parent, name = self._open_parent_blocking(key)
        try:
            try:
                st = os.stat(name, dir_fd=parent, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    raise NotFound()
                os.unlink(name, dir_fd=parent)
            except (FileNotFoundError, NotADirectoryError) as exc:
                raise NotFound() from exc
            os.fsync(parent)
        finally:
            os.close(parent)

    async def list_blobs(self, older_than: float, limit: int = 10_000) -> list[str]:
        return await run_blocking(self._list_blobs_blocking, older_than, limit)

    def _list_blobs_blocking(self, older_than: float, limit: int) -> list[str]:
        cutoff = time.time() - older_than
        found: list[str] = []
        for first in _scandirs(self._blobs):
            for second in _scandirs(first.path):
                with os.scandir(second.path) as blobs:
                    for blob in blobs:
                        try:
                            old = blob.stat(follow_symlinks=False).st_mtime <= cutoff
                        except OSError:
                            continue
                        if old and is_blob_key(blob.name):
                            found.append(blob.name)
                            if len(found) >= limit:
                                return found
        return found


def _key_parts(key: str) -> list[str]:
    """The components of a legacy key (a canonical namespace path without its leading ``/``).
    Anything a canonical path never holds (empty, ``.`` or ``..`` segments) and the internal
    area are refused with ``UnsafePath``."""
    rel = key[1:] if key.startswith("/") else key
    parts = rel.split("/")
    if not rel or parts[0] == INTERNAL_DIR or any(p in ("", ".", "..") for p in parts):
        raise UnsafePath()
    return parts


def _raise_for_component(exc: OSError, name: str, dir_fd: int) -> NoReturn:
    """Translate the failure to open ``name`` (relative to ``dir_fd``, without following it)."""
    if isinstance(exc, FileNotFoundError):
        raise NotFound() from exc
    if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EISDIR):
        # O_NOFOLLOW|O_DIRECTORY on a symlink fails with ENOTDIR on Linux: look at what it is.
        try:
            is_link = stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
        except OSError:
            is_link = False
        if is_link:
            log.error("refused a symlink inside the localfs root")
            raise UnsafePath() from exc
        raise NotFound() from exc
    raise exc


def _fanned(base: str, key: str) -> str:
    """``base/k0k1/k2k3/key``: two fan-out levels keep directories small."""
    return os.path.join(base, key[:2], key[2:4], key)


def _scandirs(path: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as entries:
            return [e for e in entries if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []
