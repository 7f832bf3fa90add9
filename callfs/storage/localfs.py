"""Local disk backend: immutable blobs under ``<root>/.callfs/`` (``docs/storage-layout.md``).

- ``<root>/.callfs/tmp/<random>.part``: writes stream here (same filesystem) and are fsync'd;
- ``<root>/.callfs/blobs/<k0k1>/<k2k3>/<key>``: ``publish`` renames the temp file here, then fsyncs
  the directory (and any fan-out directory it had to create): a crash never exposes a partial blob;
- ``<root>/.callfs/replica/...``: HA replica copies (keys ``r/<key>``), same fan-out.

Only the server names these files: client paths never map to disk paths, so no request can reach
the staging area or a blob by name. Keys that are not blob keys are legacy namespace paths (files
written before blob keys, at ``<root><engine path>``): read and deleted in place, confined to the
root with symlinks refused, and never inside ``.callfs/``.

Every operation reaches its directory from the root one component at a time (``openat`` with
``O_NOFOLLOW | O_DIRECTORY``) and then works relative to that descriptor (``dir_fd``): reads,
stats, deletes, staging, publishing, the temp sweep and the blob listing. A directory inside the
root swapped for a symlink at any moment, ``.callfs`` and its areas included, is refused (logged,
``UnsafePath``), never followed: nothing outside the root is ever created, read or removed, and
``start`` refuses a root whose internal directories are symlinks. On Linux 5.6+ reads, and
walks whose directories all exist, do the same in one ``openat2(RESOLVE_NO_SYMLINKS)`` call
(``_OPEN_NO_SYMLINKS``).

Everything the server creates under ``.callfs/`` is private to its user: directories 0700, files
0600 (``docs/security.md``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import io
import logging
import os
import stat
import sys
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from typing import IO, Any, NoReturn

from callfs.concurrency import run_blocking, run_to_end
from callfs.errors import BadRequest, CallFSError, InsufficientStorage, NotFound, UnsafePath
from callfs.log import shown_path
from callfs.storage.base import (
    AREA_BLOBS,
    AREA_REPLICAS,
    AREA_SHARDS,
    AREA_TEMP,
    REPLICA_PREFIX,
    SHARD_PREFIX,
    Chunk,
    LocalFile,
    ObjectStat,
    StoredObject,
    is_blob_key,
    is_replica_key,
)

log = logging.getLogger(__name__)

INTERNAL_DIR = ".callfs"
TMP_DIR = os.path.join(INTERNAL_DIR, "tmp")
BLOB_DIR = os.path.join(INTERNAL_DIR, "blobs")
REPLICA_DIR = os.path.join(INTERNAL_DIR, "replica")
#: Body bytes gathered before one write hop to a thread.
WRITE_BATCH = 1 << 20


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux (or a libc without it)
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Have the kernel start writing ``[offset, offset+length)`` of ``fd`` to disk now, without
    waiting (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``; nothing elsewhere). Durability
    still comes from the fsync at publish, which then finds most of a big file already written
    instead of writing all of it at the end (a 256 MiB erasure PUT waited 0.09-0.11 s of its
    0.62 s for its shards' final fsyncs; ``bench/README.md``). Errors are ignored: it is only a
    head start."""
    if _SYNC_FILE_RANGE is not None and length > 0:
        _SYNC_FILE_RANGE(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


class _OpenHow(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


_SYS_OPENAT2 = 437  # the same number on every Linux architecture (added in 5.6)
_AT_FDCWD = -100
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04


def _load_open_no_symlinks() -> Callable[[str, int], int] | None:
    """``open(path, flags)`` refusing (``ELOOP``) a symlink at *any* component of the absolute
    ``path``, in one system call: Linux ``openat2`` with ``RESOLVE_NO_SYMLINKS``. It gives what
    the component-by-component walk (``_open_dir_blocking``) gives, with one ``openat2`` instead
    of a dozen opens and closes (the walk cost about a tenth of a GET 4 KiB's CPU; each open and
    close of a write's walk, in a thread, also waited for the event loop's GIL). ``O_NOFOLLOW``
    and ``O_CLOEXEC`` are always added. None where it is not available (not Linux, a kernel
    before 5.6, a seccomp filter that refuses it): the walk is used then."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        syscall = ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):
        return None
    syscall.restype = ctypes.c_long
    hows: dict[int, tuple[_OpenHow, Any]] = {}  # flags -> the struct, a reference to it
    size = ctypes.c_size_t(ctypes.sizeof(_OpenHow))
    number, cwd = ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(_AT_FDCWD)

    def open_no_symlinks(path: str, flags: int) -> int:
        how = hows.get(flags)
        if how is None:
            made = _OpenHow(
                flags | os.O_NOFOLLOW | os.O_CLOEXEC,
                0,
                _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS,
            )
            how = hows[flags] = (made, ctypes.byref(made))
        fd = int(syscall(number, cwd, os.fsencode(path), how[1], size))
        if fd < 0:
            code = ctypes.get_errno()
            # no file name: the path is the server's, and an unexpected errno (a socket planted
            # as a blob: ENXIO) reaches the log's traceback as is (found by a security audit)
            raise OSError(code, os.strerror(code))
        return fd

    try:
        os.close(open_no_symlinks("/", os.O_RDONLY | os.O_DIRECTORY))
    except OSError:
        return None
    return open_no_symlinks


_OPEN_NO_SYMLINKS = _load_open_no_symlinks()

#: Reads up to this size are done with the open and answered inline.
SMALL_READ = 64 * 1024
READ_CHUNK = 1024 * 1024
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_DIR_FLAGS = os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW
_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK
#: Modes of what the server creates under ``.callfs/`` (before the umask): private to its user.
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
#: Directories a legacy key's write creates at its namespace path.
LEGACY_DIR_MODE = 0o755
_TMP_PARTS = (INTERNAL_DIR, "tmp")
#: Made (0700) and checked at start, in this order: a symlink at any of them refuses the start.
_INTERNAL_PARTS = ((INTERNAL_DIR,), _TMP_PARTS, (INTERNAL_DIR, "blobs"), (INTERNAL_DIR, "replica"))


#: The ``fileobj`` of a small read, which holds its bytes and no open file (already closed).
_CLOSED: IO[bytes] = io.BytesIO()
_CLOSED.close()


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
            # to its end even if the consumer is cancelled: ``aclose`` then never closes the
            # descriptor (whose number another open could take) under a read
            chunk = await run_to_end(os.pread, fd, min(READ_CHUNK, end - pos), pos)
            if not chunk:
                return
            pos += len(chunk)
            yield chunk

    async def aclose(self) -> None:
        if not self.fileobj.closed:
            self.fileobj.close()


class _Staged:
    """A staged body. Its last part (under ``WRITE_BATCH``: all of a small body) is still in
    memory when ``stage`` returns: ``publish`` writes it, fsyncs, renames and fsyncs the
    directory in one thread hop (a 4 KiB PUT took two hops and opened its file twice)."""

    def __init__(
        self,
        backend: LocalFSBackend,
        key: str,
        tmp: str,
        target: tuple[str, ...],
        size: int,
        tail: list[Chunk] | None = None,
        fileobj: IO[bytes] | None = None,
    ) -> None:
        self._backend = backend
        self.key = key
        self._tmp = tmp  # a name in .callfs/tmp
        self._target = target  # the key's components from the root
        self.size = size
        #: The bytes not yet written (``None``: the file in .callfs/tmp is complete), and the
        #: staged file's descriptor while it is open (a body bigger than one write batch).
        self._tail = tail
        self._fileobj = fileobj
        #: ``publish`` renamed the file to a new blob key (``new_blob_key``: only this object
        #: ever publishes it), and its caller was cancelled before it learned so: ``discard``
        #: removes it. A replica or shard key can be written again by another attempt, and a
        #: replica copied for a committed entry is wanted: those names are never removed here.
        self._created = False

    async def publish(self) -> None:
        def run() -> None:
            fileobj, self._fileobj = self._fileobj, None
            tail, self._tail = self._tail, None
            try:
                if tail and fileobj is not None:
                    self._backend._write_blocking(fileobj, self._tmp, self._target, tail)
                    tail = None
                created = self._backend._publish_blocking(self._tmp, self._target, fileobj, tail)
            finally:
                if fileobj is not None:
                    # after a publish, the bytes are durable: a failing close changes nothing
                    with contextlib.suppress(OSError):
                        fileobj.close()
            self._created = created and is_blob_key(self.key)

        try:
            await run_to_end(run)
        except OSError as exc:
            _raise_if_no_space(exc)
            raise
        self._created = False  # published, and the caller knows: it is the caller's now

    async def discard(self) -> None:
        if self._created:
            self._created = False
            try:  # like the temp file's removal, never raises: the orphan sweep is the fallback
                await run_blocking(self._backend._delete_blocking, self.key)
            except NotFound:
                return  # gone already
            except (UnsafePath, OSError):
                log.warning("could not remove an abandoned blob; the orphan sweep will")
            return
        fileobj, self._fileobj = self._fileobj, None
        tail, self._tail = self._tail, None
        if fileobj is not None:  # no thread uses it: stage and publish ran to their end
            with contextlib.suppress(OSError):
                fileobj.close()
        elif tail is not None:
            return  # a small body never published: nothing was written to disk
        await run_blocking(self._backend._discard_blocking, self._tmp)


#: A hard link that fails with one of these cannot be made here: ``stage_file`` copies instead.
_NO_LINK = frozenset({errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP})
#: A write that fails with one of these found no room: ``InsufficientStorage`` (507).
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


def _create_staged(tmp_dir: int, tmp: str) -> int:
    """Create the staged file ``tmp`` (0600, never an existing name or a symlink) in the
    ``.callfs/tmp`` directory ``tmp_dir``; its descriptor, open for writing."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW
    return os.open(tmp, flags, PRIVATE_FILE_MODE, dir_fd=tmp_dir)


def _write_parts(fd: int, parts: list[Chunk]) -> None:
    """Write every byte of ``parts`` to ``fd`` (a write may take fewer bytes than given)."""
    for part in parts:
        view = memoryview(part)
        while view:
            view = view[os.write(fd, view) :]


def _raise_if_no_space(exc: OSError) -> None:
    if exc.errno in _NO_SPACE:
        raise InsufficientStorage() from exc


class LocalFSBackend:
    kind = "localfs"

    def __init__(self, root: str) -> None:
        self._configured_root = root
        self._root = ""

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        await run_blocking(self._start_blocking)

    def _start_blocking(self) -> None:
        os.makedirs(self._configured_root, mode=0o755, exist_ok=True)
        self._root = os.path.realpath(self._configured_root)
        for parts in _INTERNAL_PARTS:
            try:
                fd = self._open_dir_blocking(parts, create_mode=PRIVATE_DIR_MODE)
            except (UnsafePath, NotFound) as exc:
                raise UnsafePath(
                    f"{'/'.join(parts)} in the localfs root is a symlink or not a directory: "
                    "refusing to start"
                ) from exc
            try:
                _make_private(fd, "/".join(parts))
            finally:
                os.close(fd)
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
        try:
            tmp = self._open_dir_blocking(_TMP_PARTS)
        except NotFound:
            return 0
        try:
            with os.scandir(tmp) as entries:
                # only what stage() creates
                leftovers = [e.name for e in entries if e.name.endswith(".part")]
            for name in leftovers:
                try:
                    if os.stat(name, dir_fd=tmp, follow_symlinks=False).st_mtime <= cutoff:
                        os.unlink(name, dir_fd=tmp)
                        removed += 1
                except OSError:
                    continue
        finally:
            os.close(tmp)
        return removed

    # ---- path confinement ------------------------------------------------------------------
    def _open_dir_blocking(
        self,
        parts: Sequence[str],
        create_mode: int | None = None,
        made: list[int] | None = None,
    ) -> int:
        """A descriptor of the directory ``<root>/<parts...>``.

        It is reached from the root one component at a time, each opened relative to the
        previous one with ``O_NOFOLLOW | O_DIRECTORY``: a component that is (or has just become)
        a symlink is refused (``UnsafePath``, logged), never followed, whatever was verified
        before. A missing component raises ``NotFound``, or with ``create_mode`` is made (mkdir
        relative to its parent, which is then fsync'd so the new entry survives a crash; with
        ``made``, a descriptor of that parent is appended to it instead, for the caller to fsync
        and close later). A component that is not a directory raises ``NotFound``
        (``UnsafePath`` when creating).
        """
        if not self._root:
            raise RuntimeError("LocalFSBackend used before start()")
        found = self._open_dir_at_once(parts, create_mode, made)
        if found is not None:
            return found
        # self._root was made a real path at start: no component of it is a symlink.
        fd = os.open(self._root, os.O_RDONLY | _O_DIRECTORY)
        try:
            for name in parts:
                child = _open_child_dir(fd, name, create_mode, made)
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _open_dir_at_once(
        self, parts: Sequence[str], create_mode: int | None, made: list[int] | None
    ) -> int | None:
        """``_open_dir_blocking``'s shortcut (None: take the walk): the whole way in one
        ``openat2``; a new blob's missing fan-out leaf from its parent, opened the same way, then
        made by the walk's own step. Anything else (more missing, a symlink to refuse and log) is
        left to the walk."""
        if _OPEN_NO_SYMLINKS is None or not parts:
            return None
        try:
            return _OPEN_NO_SYMLINKS(self._path(parts), _DIR_FLAGS)
        except OSError as exc:
            if exc.errno != errno.ENOENT or create_mode is None:
                return None
        try:
            parent = _OPEN_NO_SYMLINKS(self._path(parts[:-1]), _DIR_FLAGS)
        except OSError:
            return None
        try:
            return _open_child_dir(parent, parts[-1], create_mode, made)
        finally:
            os.close(parent)

    def _path(self, parts: Sequence[str]) -> str:
        """The absolute path of ``<root>/<parts...>`` (for ``openat2``, which checks every
        component itself)."""
        return f"{self._root}/{'/'.join(parts)}" if parts else self._root

    def _open_for_read(self, key: str) -> int:
        """A read-only descriptor of ``key``'s file, no component of its path followed if it is
        a symlink (the root is a real path since ``start``)."""
        if not self._root:
            raise RuntimeError("LocalFSBackend used before start()")
        parts = _key_path(key)
        if _OPEN_NO_SYMLINKS is None:
            parent = self._open_dir_blocking(parts[:-1])
            try:
                return os.open(parts[-1], os.O_RDONLY | _O_NOFOLLOW | os.O_NONBLOCK, dir_fd=parent)
            except OSError as exc:
                _raise_for_component(exc, parts[-1], parent)
            finally:
                os.close(parent)
        try:
            return _OPEN_NO_SYMLINKS(self._path(parts), _READ_FLAGS)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                raise NotFound() from exc
            if exc.errno == errno.ELOOP:
                log.error(
                    "refused a symlink inside the localfs root (on the way to %s)", shown_path(key)
                )
                raise UnsafePath() from exc
            raise

    def _open_parent_blocking(self, key: str) -> tuple[int, str]:
        """A descriptor of the directory holding ``key`` (``_open_dir_blocking``, so a symlink on
        the way is refused) and the key's last component. The caller closes the descriptor and
        opens or stats the last component relative to it, without following it either."""
        parts = _key_path(key)
        return self._open_dir_blocking(parts[:-1]), parts[-1]

    # ---- writes ----------------------------------------------------------------------------
    async def stage(self, key: str, chunks: AsyncIterable[Chunk]) -> _Staged:
        if not self._root:
            raise RuntimeError("LocalFSBackend used before start()")
        target = _key_path(key)
        tmp = f"{os.urandom(12).hex()}.part"
        pending: list[Chunk] = []
        pending_size = 0
        size = 0
        opened: list[IO[bytes]] = []  # the staged file, once a write hop created it

        def write(parts: list[Chunk]) -> None:
            fileobj = self._write_blocking(opened[0] if opened else None, tmp, target, parts, True)
            if not opened:
                opened.append(fileobj)

        try:
            # Each hop runs to its end even if this task is cancelled meanwhile (a shutdown, a
            # failing erasure upload stopping its other shard writers): the cleanup below never
            # races a write that is creating or writing the file.
            async for chunk in chunks:
                if not chunk:
                    continue
                pending.append(chunk)
                pending_size += len(chunk)
                size += len(chunk)
                if pending_size >= WRITE_BATCH:
                    await run_to_end(write, pending)
                    pending = []
                    pending_size = 0
        except BaseException as exc:
            if opened:  # closed here: the write hops ran to their end (``run_to_end``)
                with contextlib.suppress(OSError):
                    opened[0].close()
            await run_blocking(self._discard_blocking, tmp)
            if isinstance(exc, OSError):
                _raise_if_no_space(exc)
            raise
        # The last part is written by ``publish``, in the hop that makes the file durable.
        return _Staged(self, key, tmp, target, size, pending, opened[0] if opened else None)

    async def stage_file(self, key: str, source: str) -> _Staged:
        """A hard link of ``source`` in ``.callfs/tmp`` (no copy: a finished resumable upload
        becomes a blob by link + the usual publish rename); a copy when the link is impossible
        (another filesystem, a filesystem without links)."""
        if not self._root:
            raise RuntimeError("LocalFSBackend used before start()")
        target = _key_path(key)
        tmp = f"{os.urandom(12).hex()}.part"
        try:
            size = await run_to_end(self._link_blocking, source, tmp, target)
        except OSError as exc:
            if exc.errno not in _NO_LINK:
                raise
            return await self.stage(key, LocalFile(source))
        except BaseException:  # cancelled: the link, if made, goes now rather than at the sweep
            await run_blocking(self._discard_blocking, tmp)
            raise
        return _Staged(self, key, tmp, target, size)

    def _link_blocking(self, source: str, tmp: str, target: tuple[str, ...]) -> int:
        """Link ``source`` (a regular file, not followed if a symlink) as ``tmp`` in the staging
        directory reached by the walk; its mtime becomes now, so the orphan sweep's grace counts
        from the publish, not from the file's last write. Returns its size."""
        self._check_target_blocking(target)
        try:
            st = os.stat(source, follow_symlinks=False)
        except FileNotFoundError as exc:
            raise NotFound() from exc
        if not stat.S_ISREG(st.st_mode):
            raise NotFound()
        tmp_dir = self._open_dir_blocking(_TMP_PARTS)
        try:
            os.link(source, tmp, dst_dir_fd=tmp_dir, follow_symlinks=False)
            os.utime(tmp, dir_fd=tmp_dir, follow_symlinks=False)
        finally:
            os.close(tmp_dir)
        return st.st_size

    def _write_blocking(
        self,
        fileobj: IO[bytes] | None,
        tmp: str,
        target: tuple[str, ...],
        parts: list[Chunk],
        writeback: bool = False,
    ) -> IO[bytes]:
        """Write ``parts`` to the staged file, which the first call creates (0600) in
        ``.callfs/tmp`` reached by the walk, after checking that no directory already on the way
        to ``target`` is a symlink (``UnsafePath``). With ``writeback`` (a body that goes on),
        the kernel starts writing these bytes to disk at once (``start_writeback``)."""
        opened = fileobj is None
        if fileobj is None:
            self._check_target_blocking(target)
            tmp_dir = self._open_dir_blocking(_TMP_PARTS)
            try:
                fd = _create_staged(tmp_dir, tmp)
            finally:
                os.close(tmp_dir)
            fileobj = os.fdopen(fd, "wb", buffering=0)
        try:
            start = fileobj.tell() if writeback else 0
            _write_parts(fileobj.fileno(), parts)
            if writeback:
                start_writeback(fileobj.fileno(), start, fileobj.tell() - start)
        except BaseException:
            if opened:  # the caller never got it: close it here (a full disk fails the 1st write)
                fileobj.close()
            raise
        return fileobj

    def _check_target_blocking(self, target: tuple[str, ...]) -> None:
        """Refuse (``UnsafePath``) a symlink among the directories on the way to ``target`` that
        exist already; missing ones are made at publish (a file in the way fails there)."""
        with contextlib.suppress(NotFound):
            os.close(self._open_dir_blocking(target[:-1]))

    def _publish_blocking(
        self,
        tmp: str,
        target: tuple[str, ...],
        written: IO[bytes] | None = None,
        parts: list[Chunk] | None = None,
    ) -> bool:
        """Make the staged file durable and rename it from ``.callfs/tmp`` into the target's
        directory, both reached by the walk (missing fan-out directories made 0700, each fsync'd
        into its parent), then fsync that directory. The file is ``written`` (its open
        descriptor, which stays open), or is made here (0600) from ``parts`` (a small body: one
        hop for all of it), or else is opened here. Nothing is ever renamed out of or into a
        directory outside the root, even if one on the way was swapped for a symlink after
        ``stage``.

        A new name (every blob: a fresh key per version) is renamed first and fsync'd after: on
        ext4 and XFS that one fsync commits the data, the rename and any fan-out directory made
        on the way together (each such directory's parent is still fsync'd, after it), where
        fsync, rename and a directory fsync per step cost a journal commit each. Until the caller
        commits metadata naming the key, a crash leaves at most an orphan there (removed by the
        orphan sweep), never a visible partial file. A name that exists (an overwrite) is fsync'd
        before the rename, so a power cut leaves the old bytes or the new, never neither. A
        failed fsync removes the renamed file and raises. Returns whether the name is new."""
        mode = PRIVATE_DIR_MODE if target[0] == INTERNAL_DIR else LEGACY_DIR_MODE
        tmp_dir = self._open_dir_blocking(_TMP_PARTS)
        made: list[int] = []  # parents of fan-out directories made now: fsync'd after the file
        if written is not None:
            fd = written.fileno()
        else:
            try:
                if parts is None:
                    fd = os.open(tmp, os.O_RDONLY | _O_NOFOLLOW, dir_fd=tmp_dir)
                else:
                    fd = _create_staged(tmp_dir, tmp)
                    try:
                        _write_parts(fd, parts)
                    except BaseException:
                        os.close(fd)  # the file stays for ``discard`` to remove
                        raise
            except BaseException:
                os.close(tmp_dir)
                raise
        try:
            parent = self._open_dir_blocking(target[:-1], create_mode=mode, made=made)
            try:
                name = target[-1]
                try:
                    found = os.stat(name, dir_fd=parent, follow_symlinks=False)
                except FileNotFoundError:
                    found = None
                if found is not None and stat.S_ISDIR(found.st_mode):
                    raise UnsafePath()
                if found is not None:
                    os.fsync(fd)
                os.rename(tmp, name, src_dir_fd=tmp_dir, dst_dir_fd=parent)
                if found is None:
                    try:
                        os.fsync(fd)
                    except BaseException:
                        with contextlib.suppress(OSError):
                            os.unlink(name, dir_fd=parent)
                        raise
                for made_in in made:
                    os.fsync(made_in)
                os.fsync(parent)
                return found is None
            finally:
                os.close(parent)
        finally:
            for made_in in made:
                os.close(made_in)
            if written is None:
                os.close(fd)
            os.close(tmp_dir)

    def _discard_blocking(self, tmp: str) -> None:
        """Remove the staged file ``tmp`` from ``.callfs/tmp`` (reached by the walk), quietly."""
        try:
            tmp_dir = self._open_dir_blocking(_TMP_PARTS)
        except (NotFound, UnsafePath):
            log.warning("could not remove a temporary upload file: no safe .callfs/tmp")
            return
        try:
            os.unlink(tmp, dir_fd=tmp_dir)
        except FileNotFoundError:
            pass
        except OSError:
            log.warning("could not remove a temporary upload file", exc_info=True)
        finally:
            os.close(tmp_dir)

    # ---- reads -----------------------------------------------------------------------------
    async def open_read(
        self, key: str, offset: int = 0, length: int | None = None
    ) -> LocalFileStream:
        # Inline, on purpose: the open is a walk of cached directories + open + fstat (and for
        # up to SMALL_READ bytes one pread of page-cached data), about 20 us. Handed to a thread
        # it cost far more: each of its short syscalls gives up the GIL and waits to get it back
        # from the busy loop (GET 1 MiB, 16 connections: 1,737-2,044 req/s threaded, 2,504-2,585
        # inline). On a cold directory cache the open can wait for a disk read, as sendfile
        # already does on the loop for the file's own bytes; bigger reads go to threads.
        return self._open_blocking(key, offset, length)

    def _open_blocking(self, key: str, offset: int, length: int | None) -> LocalFileStream:
        # O_NONBLOCK: a FIFO or device planted under the root must not hold the loop in open()
        # (it is refused below); a regular file's reads ignore the flag.
        fd = self._open_for_read(key)
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise NotFound()
        start = min(max(offset, 0), st.st_size)
        end = st.st_size if length is None else min(st.st_size, start + max(length, 0))
        count = end - start
        if count <= SMALL_READ:
            # Read whole here and closed at once: no file object is made for the descriptor.
            try:
                small = os.pread(fd, count, start) if count else b""
            finally:
                os.close(fd)
            return LocalFileStream(_CLOSED, start, count, small)
        fileobj = os.fdopen(fd, "rb", buffering=0)
        try:
            return LocalFileStream(fileobj, start, count, None)
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

    async def file_identity(self, key: str) -> tuple[int, int] | None:
        """``(st_dev, st_ino)`` of the file at ``key`` (a hard link of a staged file has the
        staged file's), or None if there is none."""
        try:
            st = await run_blocking(self._lstat_blocking, key)
        except (CallFSError, FileNotFoundError, NotADirectoryError):
            return None  # (a symlink on the way, UnsafePath, included: not a file of ours)
        return (st.st_dev, st.st_ino) if stat.S_ISREG(st.st_mode) else None

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
        itself, never followed), then fsync that directory. A shard's directories left empty
        go too (``.erasure/<upload id>/``: one per erasure-coded file ever stored had stayed)."""
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
        if key.startswith(SHARD_PREFIX):
            self._drop_empty_parents_blocking(_key_path(key)[:-1])

    def _drop_empty_parents_blocking(self, parts: tuple[str, ...]) -> None:
        """Remove the directories ``parts`` names, deepest first, while they are empty, never
        ``.erasure`` itself. A writer racing it into one of them fails and is retried."""
        while len(parts) > 1:
            try:
                holder = self._open_dir_blocking(parts[:-1])
            except (CallFSError, OSError):
                return
            try:
                os.rmdir(parts[-1], dir_fd=holder)
                os.fsync(holder)
            except OSError:
                return  # not empty (or gone): stop here
            finally:
                os.close(holder)
            parts = parts[:-1]

    async def list_blobs(self, older_than: float, limit: int = 10_000) -> list[str]:
        return await run_blocking(self._list_blobs_blocking, older_than, limit)

    def _list_blobs_blocking(self, older_than: float, limit: int) -> list[str]:
        """Old blob names under ``.callfs/blobs``, each fan-out directory opened relative to its
        parent without following a symlink (one is skipped)."""
        found: list[str] = []
        try:
            blobs = self._open_dir_blocking((INTERNAL_DIR, "blobs"))
        except NotFound:
            return found
        try:
            _collect_old_blobs(blobs, 2, time.time() - older_than, limit, found)
        finally:
            os.close(blobs)
        return found

    async def list_keys(self, area: str, after: str = "", limit: int = 1000) -> list[StoredObject]:
        if area not in _AREAS:
            raise BadRequest(f"unknown storage area {area!r}")
        return await run_blocking(self._list_keys_blocking, area, after, max(limit, 1))

    def _list_keys_blocking(self, area: str, after: str, limit: int) -> list[StoredObject]:
        """One page of ``area``, each directory reached by the walk (a symlink is refused)."""
        parts, depth = _AREAS[area]
        found: list[StoredObject] = []
        try:
            top = self._open_dir_blocking(parts)
        except NotFound:
            return found
        try:
            _collect_area(area, top, depth, (), _area_parts(area, after), limit, found)
        finally:
            os.close(top)
        return found


#: ``list_keys`` areas: (directory from the root, fan-out levels, key of a leaf's components).
_AREAS: dict[str, tuple[tuple[str, ...], int]] = {
    AREA_BLOBS: ((INTERNAL_DIR, "blobs"), 2),
    AREA_REPLICAS: ((INTERNAL_DIR, "replica"), 2),
    AREA_SHARDS: ((SHARD_PREFIX.rstrip("/"),), 1),
    AREA_TEMP: (_TMP_PARTS, 0),
}


def _area_key(area: str, parts: tuple[str, ...]) -> str:
    if area == AREA_BLOBS:
        return parts[-1]
    if area == AREA_REPLICAS:
        return REPLICA_PREFIX + parts[-1]
    if area == AREA_SHARDS:
        return f"{SHARD_PREFIX}{parts[0]}/{parts[1]}"
    return f"{TMP_DIR}/{parts[-1]}"


def _area_parts(area: str, key: str) -> tuple[str, ...]:
    """The components below the area's directory of a key ``_area_key`` made (for ``after``)."""
    if not key:
        return ()
    if area in (AREA_BLOBS, AREA_REPLICAS):
        name = key.removeprefix(REPLICA_PREFIX) if area == AREA_REPLICAS else key
        return (name[:2], name[2:4], name)
    if area == AREA_SHARDS:
        upload, _, index = key.removeprefix(SHARD_PREFIX).partition("/")
        return (upload, index)
    return (key.rpartition("/")[2],)


def _area_name_ok(area: str, depth: int, name: str) -> bool:
    """Only what the server makes is listed: fan-out directories, blob keys, shard indexes."""
    if area == AREA_TEMP:
        return name.endswith(".part")
    if area == AREA_SHARDS:
        return is_blob_key(name) if depth else name.isascii() and name.isdigit()
    return len(name) == 2 if depth else is_blob_key(name)


def _collect_area(
    area: str,
    directory: int,
    depth: int,
    prefix: tuple[str, ...],
    after: tuple[str, ...],
    limit: int,
    found: list[StoredObject],
) -> None:
    """Add to ``found`` (up to ``limit``, in key order) the leaves ``depth`` levels below
    ``directory`` whose components come after ``after``; symlinks are skipped, never followed.
    Subtrees wholly before ``after`` are not opened."""
    with os.scandir(directory) as entries:
        names = sorted(
            e.name
            for e in entries
            if _area_name_ok(area, depth, e.name)
            and (e.is_dir(follow_symlinks=False) if depth else e.is_file(follow_symlinks=False))
        )
    for name in names:
        if len(found) >= limit:
            return
        parts = (*prefix, name)
        if after and parts < after[: len(parts)]:
            continue
        if not depth:
            if after and parts <= after:
                continue
            try:
                st = os.stat(name, dir_fd=directory, follow_symlinks=False)
            except OSError:
                continue  # removed meanwhile
            found.append(StoredObject(_area_key(area, parts), st.st_size, st.st_mtime))
            continue
        try:
            child = os.open(name, _DIR_FLAGS, dir_fd=directory)
        except OSError:
            continue  # gone, or swapped for a symlink meanwhile
        try:
            _collect_area(area, child, depth - 1, parts, after, limit, found)
        finally:
            os.close(child)


def _key_path(key: str) -> tuple[str, ...]:
    """The components of ``key``'s location from the root: blobs and replica copies under
    ``.callfs/`` (two fan-out levels keep directories small), a legacy key at its path."""
    if is_blob_key(key):
        return (INTERNAL_DIR, "blobs", key[:2], key[2:4], key)
    if is_replica_key(key):
        blob = key[len(REPLICA_PREFIX) :]
        return (INTERNAL_DIR, "replica", blob[:2], blob[2:4], blob)
    return tuple(_key_parts(key))


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
            log.error("refused a symlink inside the localfs root (at %s)", shown_path(name))
            raise UnsafePath() from exc
        raise NotFound() from exc
    raise exc


def _open_child_dir(
    parent: int, name: str, create_mode: int | None, made: list[int] | None = None
) -> int:
    """Open the directory ``name`` relative to ``parent`` without following it; with
    ``create_mode``, make it first if missing (see ``LocalFSBackend._open_dir_blocking``)."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent)
    except OSError as exc:
        if create_mode is None or not isinstance(exc, FileNotFoundError):
            try:
                _raise_for_component(exc, name, parent)
            except NotFound:
                if create_mode is None:
                    raise
                raise UnsafePath() from exc  # a file where a directory must be made
    with contextlib.suppress(FileExistsError):
        # made meanwhile by another writer (a symlink made meanwhile is refused below), which
        # may not have fsync'd ``parent`` yet and may fail before it does: an acknowledged
        # write of ours in that directory must not depend on it, so ours does it too
        os.mkdir(name, create_mode, dir_fd=parent)
    if made is None:
        os.fsync(parent)
    else:
        made.append(os.dup(parent))
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent)
    except OSError as exc:
        _raise_for_component(exc, name, parent)


def _make_private(fd: int, what: str) -> None:
    """Take group and other access away from a directory of the server (made by an earlier
    version with 0755, say)."""
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, PRIVATE_DIR_MODE)
    except OSError:
        log.warning("could not make %s in the localfs root private (mode 0700)", what)


def _collect_old_blobs(
    directory: int, depth: int, cutoff: float, limit: int, found: list[str]
) -> None:
    """Add to ``found`` (up to ``limit``) the blob names ``depth`` fan-out levels below
    ``directory`` last written before ``cutoff``; symlinks are skipped, never followed."""
    with os.scandir(directory) as entries:
        if depth:
            names = [e.name for e in entries if e.is_dir(follow_symlinks=False)]
        else:
            names = [e.name for e in entries if is_blob_key(e.name)]
    for name in names:
        if len(found) >= limit:
            return
        try:
            if depth:
                child = os.open(name, _DIR_FLAGS, dir_fd=directory)
            else:
                st = os.stat(name, dir_fd=directory, follow_symlinks=False)
        except OSError:
            continue  # gone, or swapped for a symlink meanwhile
        if not depth:
            if st.st_mtime <= cutoff:
                found.append(name)
            continue
        try:
            _collect_old_blobs(child, depth - 1, cutoff, limit, found)
        finally:
            os.close(child)
