"""Local disk backend: ``<root><engine path>`` for files, real directories for directories.

Writes stream into a temp file under ``<root>/.callfs-tmp`` (same filesystem), are fsync'd, and are
renamed into place by ``publish`` (then the directory is fsync'd): a crash never exposes a partial
file. Every path is confined to the root; symlinks that lead outside it are refused.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import AsyncIterable, AsyncIterator
from typing import IO

from callfs.concurrency import run_blocking
from callfs.errors import AlreadyExists, DirectoryNotEmpty, NotFound, UnsafePath
from callfs.storage.base import ObjectStat

log = logging.getLogger(__name__)

TMP_DIR = ".callfs-tmp"
#: Body bytes gathered before one write hop to a thread.
WRITE_BATCH = 1 << 20
#: Reads up to this size are done in the same thread hop as the open and answered inline.
SMALL_READ = 64 * 1024
READ_CHUNK = 1024 * 1024
_VERIFIED_MAX = 4096
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


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
    def __init__(self, backend: LocalFSBackend, tmp: str, target: str, size: int) -> None:
        self._backend = backend
        self._tmp = tmp
        self._target = target
        self.size = size

    async def publish(self) -> None:
        await run_blocking(self._backend._publish_blocking, self._tmp, self._target)

    async def discard(self) -> None:
        await run_blocking(_unlink_quietly, self._tmp)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:
        log.warning("could not remove a temporary upload file", exc_info=True)


class LocalFSBackend:
    kind = "localfs"

    def __init__(self, root: str) -> None:
        self._configured_root = root
        self._root = ""
        self._tmp = ""
        #: Parent directories already resolved inside the root (realpath is ~20 us on a hot path).
        #: CallFS never creates symlinks; any directory move or delete clears the memo, so a
        #: renamed directory is resolved again.
        self._verified: dict[str, str] = {}

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        await run_blocking(self._start_blocking)

    def _start_blocking(self) -> None:
        os.makedirs(self._configured_root, mode=0o755, exist_ok=True)
        self._root = os.path.realpath(self._configured_root)
        self._tmp = os.path.join(self._root, TMP_DIR)
        os.makedirs(self._tmp, mode=0o700, exist_ok=True)
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
        for entry in os.scandir(self._tmp):
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

    def _resolve(self, path: str) -> str:
        """Absolute location of an engine path. Its parent must resolve inside the root (symlinks
        followed); the last component itself is never followed (callers use O_NOFOLLOW/lstat)."""
        if not self._root:
            raise RuntimeError("LocalFSBackend used before start()")
        rel = path.lstrip("/")
        if not rel:
            return self._root
        full = os.path.join(self._root, rel)
        logical = os.path.dirname(full)
        parent = self._verified.get(logical)
        if parent is None:
            parent = os.path.realpath(logical)
            if not self._inside(parent):
                log.error("refused a path that resolves outside the localfs root")
                raise UnsafePath()
            if len(self._verified) >= _VERIFIED_MAX:
                self._verified.clear()
            self._verified[logical] = parent
        return os.path.join(parent, os.path.basename(full))

    # ---- writes ----------------------------------------------------------------------------
    async def stage(self, path: str, chunks: AsyncIterable[bytes]) -> _Staged:
        target = self._resolve(path)
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
        except BaseException:
            if fileobj is not None and not fileobj.closed:
                fileobj.close()
            await run_blocking(_unlink_quietly, tmp)
            raise
        return _Staged(self, tmp, target, size)

    @staticmethod
    def _write_blocking(fileobj: IO[bytes] | None, tmp: str, parts: list[bytes]) -> IO[bytes]:
        if fileobj is None:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            fileobj = os.fdopen(fd, "wb", buffering=0)
        for part in parts:
            view = memoryview(part)
            while view:
                written = fileobj.write(view)
                view = view[written or 0 :]
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
                raise AlreadyExists("path exists as directory")
        except FileNotFoundError:
            pass
        os.replace(tmp, target)
        _fsync_dir(parent)

    def _makedirs_blocking(self, full: str) -> None:
        try:
            os.makedirs(full, mode=0o755, exist_ok=True)
        except FileExistsError as exc:
            raise AlreadyExists("a parent path is a file") from exc
        except NotADirectoryError as exc:
            raise AlreadyExists("a parent path is a file") from exc
        if not self._inside(os.path.realpath(full)):
            raise UnsafePath()

    # ---- reads -----------------------------------------------------------------------------
    async def open_read(
        self, path: str, offset: int = 0, length: int | None = None
    ) -> LocalFileStream:
        full = self._resolve(path)
        if length is not None and length <= SMALL_READ:
            # A small range is one open + fstat + pread of page-cached data: cheaper inline than the
            # thread hop (bench/README.md records the measurement). Large reads stay off the loop.
            return self._open_blocking(full, offset, length)
        return await run_blocking(self._open_blocking, full, offset, length)

    @staticmethod
    def _open_blocking(full: str, offset: int, length: int | None) -> LocalFileStream:
        try:
            fd = os.open(full, os.O_RDONLY | _O_NOFOLLOW)
        except FileNotFoundError as exc:
            raise NotFound() from exc
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafePath() from exc
            if exc.errno in (errno.ENOTDIR, errno.EISDIR):
                raise NotFound() from exc
            raise
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

    async def stat(self, path: str) -> ObjectStat | None:
        full = self._resolve(path)
        try:
            st = await run_blocking(os.lstat, full)
        except FileNotFoundError:
            return None
        except NotADirectoryError:
            return None
        return ObjectStat(
            size=st.st_size if stat.S_ISREG(st.st_mode) else 0,
            is_dir=stat.S_ISDIR(st.st_mode),
            mtime=st.st_mtime,
        )

    # ---- namespace changes -----------------------------------------------------------------
    async def mkdir(self, path: str) -> None:
        full = self._resolve(path)
        await run_blocking(self._mkdir_blocking, full)

    def _mkdir_blocking(self, full: str) -> None:
        try:
            st = os.lstat(full)
        except FileNotFoundError:
            self._makedirs_blocking(full)
            _fsync_dir(os.path.dirname(full))
            return
        if stat.S_ISLNK(st.st_mode):
            raise UnsafePath()
        if not stat.S_ISDIR(st.st_mode):
            raise AlreadyExists("path exists as file")

    async def delete(self, path: str) -> None:
        full = self._resolve(path)
        if full == self._root:
            raise DirectoryNotEmpty("the root is never removed")
        self._verified.clear()
        await run_blocking(self._delete_blocking, full)

    @staticmethod
    def _delete_blocking(full: str) -> None:
        try:
            st = os.lstat(full)
            if stat.S_ISDIR(st.st_mode):
                os.rmdir(full)
            else:
                os.unlink(full)
        except FileNotFoundError as exc:
            raise NotFound() from exc
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise DirectoryNotEmpty() from exc
            if exc.errno == errno.ENOTDIR:
                raise NotFound() from exc
            raise
        _fsync_dir(os.path.dirname(full))

    async def move(self, src: str, dst: str) -> None:
        src_full = self._resolve(src)
        dst_full = self._resolve(dst)
        self._verified.clear()
        await run_blocking(self._move_blocking, src_full, dst_full)

    def _move_blocking(self, src_full: str, dst_full: str) -> None:
        if not os.path.lexists(src_full):
            raise NotFound()
        self._makedirs_blocking(os.path.dirname(dst_full))
        os.replace(src_full, dst_full)
        _fsync_dir(os.path.dirname(dst_full))
        if os.path.dirname(src_full) != os.path.dirname(dst_full):
            _fsync_dir(os.path.dirname(src_full))
