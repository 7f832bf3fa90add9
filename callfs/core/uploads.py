"""Resumable uploads (tus 1.0, ``docs/uploads.md``): durable staging on the node that created them.

An upload is a directory ``<localfs root>/.callfs/uploads/<token>/`` holding

- ``data.part``: the bytes received so far (0600), written at the acknowledged offset;
- ``state.json``: ``length``, ``offset``, destination ``path``, raw ``Upload-Metadata``, the
  creator (``owner``), ``expires``, and whether the finished upload was ``committed``. It is
  replaced atomically (write, fsync, rename, directory fsync).

``data.part`` is fsync'd before ``state.json`` records a new offset, and the offset is answered only
after that: a crash or a client gone mid-PATCH never loses acknowledged bytes, and bytes past the
recorded offset (a crash before the state write) are cut off by the next PATCH. When the offset
reaches the length, the bytes commit through ``Engine.put_file`` as the creator (``create_file``
with an ``ErasureRequest`` when the metadata asks for erasure and nothing exists yet): the same
permission check, lock, conditional command, owner and replication as a PUT. The commit streams the
staged file into a new blob (one copy; see "left" in docs/uploads.md). A destination owned by
another node is sent to that node (``PeerClient.put_file``), like a proxied PUT.

The public ID is ``<node>.<token>``: ``<node>`` is this node's instance ID in unpadded base64url,
so any node can tell where an upload lives and proxy to it (``api/uploads.py``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import time
from collections.abc import AsyncIterable, Callable
from dataclasses import dataclass, replace
from typing import Any

from callfs.auth.policy import check_write
from callfs.concurrency import run_blocking, run_to_end, to_end
from callfs.core.engine import Engine, ErasureRequest
from callfs.errors import (
    AlreadyExists,
    BadRequest,
    CallFSError,
    ChecksumMismatch,
    InternalError,
    ParentNotDirectory,
    PayloadTooLarge,
    PeerUnavailable,
    PermissionDenied,
    RemoteOwner,
    Unavailable,
    UnsafePath,
    UploadCommitInDoubt,
    UploadExpired,
    UploadNotFound,
    UploadOffsetMismatch,
)
from callfs.log import shown_size
from callfs.model import BackendType, Entry, Identity, parent_of
from callfs.paths import CanonicalPath, parse_body_path
from callfs.storage.base import LocalFile
from callfs.storage.instrumented import InstrumentedBackend
from callfs.storage.localfs import LocalFSBackend

log = logging.getLogger(__name__)

#: An upload nobody touched for this long expires and its bytes are removed (``Upload-Expires``).
DEFAULT_EXPIRY = 24 * 3600.0
#: How often the node sweeps expired uploads.
SWEEP_INTERVAL = 600.0
#: ``Upload-Checksum`` algorithms (tus names -> hashlib names).
CHECKSUM_ALGORITHMS = {"sha1": "sha1", "sha256": "sha256", "md5": "md5"}
#: The largest ``Upload-Metadata`` header kept with an upload.
MAX_METADATA = 4096
#: Body bytes gathered before one write hop to a thread (as localfs).
_WRITE_BATCH = 1 << 20
_DATA = "data.part"
_STATE = "state.json"
_TOKEN = re.compile(r"[0-9a-f]{32}")
_META_KEY = re.compile(r"[^\s,]+")
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


@dataclass(frozen=True, slots=True)
class Checksum:
    """An ``Upload-Checksum``: the digest the PATCH body must have."""

    algorithm: str
    digest: bytes


@dataclass(frozen=True, slots=True)
class Upload:
    id: str
    length: int
    offset: int
    owner: str
    path: str
    metadata: str
    erasure: bool
    expires: float
    committed: bool = False
    #: The destination as it was when the last PATCH began (``destination_basis``): a commit
    #: tried again (a crash, a lost answer) happens only if it is still so.
    basis: str | None = None
    #: A commit was started and may have happened (a crash, a 503, a cancel after it began);
    #: False again once one certainly failed (a 403, a 409: nothing was applied).
    trying: bool = False

    @property
    def complete(self) -> bool:
        return self.offset == self.length


#: Failures after which a commit may still have happened (a store or peer outage, a timeout, a
#: bug): the upload stays ``trying``.
_MAYBE_APPLIED = (Unavailable, PeerUnavailable, InternalError, TimeoutError, OSError)


def destination_basis(entry: Entry | None) -> str:
    """What a commit compares: the destination's identity (any write changes it)."""
    if entry is None:
        return "absent"
    return (
        f"{entry.type.value}:{entry.version}:{entry.blob_key}:{entry.created_at}:"
        f"{entry.mtime}:{entry.size}"
    )


def encode_node(instance_id: str) -> str:
    return base64.urlsafe_b64encode(instance_id.encode()).rstrip(b"=").decode()


def node_of(upload_id: str) -> tuple[str, str]:
    """The (instance ID, token) an upload ID names; ``UploadNotFound`` if it is not one."""
    node, dot, token = upload_id.rpartition(".")
    if not dot or not node or not _TOKEN.fullmatch(token) or not re.fullmatch(r"[\w-]+", node):
        raise UploadNotFound()
    try:
        instance = base64.urlsafe_b64decode(node + "=" * (-len(node) % 4)).decode()
    except (ValueError, binascii.Error) as exc:
        raise UploadNotFound() from exc
    if not instance:
        raise UploadNotFound()
    return instance, token


def parse_metadata(header: str) -> dict[str, str]:
    """``Upload-Metadata``: comma-separated ``key base64value`` pairs (the value is optional).
    Values that are not UTF-8 are kept out (only ``path`` and ``erasure`` are read here)."""
    if len(header.encode()) > MAX_METADATA:
        raise BadRequest(f"Upload-Metadata is longer than {MAX_METADATA} bytes")
    found: dict[str, str] = {}
    for pair in header.split(","):
        pair = pair.strip()
        if not pair:
            continue
        key, _, value = pair.partition(" ")
        value = value.strip()
        if not _META_KEY.fullmatch(key) or key in found or " " in value:
            raise BadRequest("invalid Upload-Metadata")
        try:
            raw = base64.b64decode(value, validate=True) if value else b""
        except (ValueError, binascii.Error) as exc:
            raise BadRequest("invalid Upload-Metadata: values are base64") from exc
        try:
            found[key] = raw.decode()
        except UnicodeDecodeError:
            found[key] = ""
    return found


def parse_checksum(header: str) -> Checksum:
    """``Upload-Checksum: <algorithm> <base64 digest>``; 400 for another algorithm or form."""
    algorithm, _, value = header.strip().partition(" ")
    if algorithm not in CHECKSUM_ALGORITHMS:
        raise BadRequest("unsupported checksum algorithm")
    try:
        digest = base64.b64decode(value.strip(), validate=True)
    except (ValueError, binascii.Error) as exc:
        raise BadRequest("invalid Upload-Checksum") from exc
    if len(digest) != hashlib.new(CHECKSUM_ALGORITHMS[algorithm]).digest_size:
        raise BadRequest("invalid Upload-Checksum")
    return Checksum(algorithm, digest)


class UploadService:
    """Creates, appends to, commits and expires this node's resumable uploads."""

    def __init__(
        self,
        engine: Engine,
        directory: str,
        max_size: int,
        expiry: float = DEFAULT_EXPIRY,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._engine = engine
        self._dir = directory
        self.max_size = max_size
        self.expiry = expiry
        self._clock = clock
        self.instance_id = engine.settings.instance_id
        self._prefix = encode_node(self.instance_id) + "."
        #: One appender (or terminator) per upload at a time; HEAD reads the atomic state file.
        self._locks: dict[str, asyncio.Lock] = {}

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        await run_blocking(self._start_blocking)

    def _start_blocking(self) -> None:
        os.makedirs(self._dir, mode=0o700, exist_ok=True)
        st = os.lstat(self._dir)
        if not stat.S_ISDIR(st.st_mode) or os.path.realpath(self._dir) != os.path.abspath(
            self._dir
        ):
            raise UnsafePath(
                ".callfs/uploads in the localfs root is a symlink or not a directory: "
                "refusing to start"
            )
        if st.st_mode & 0o077:
            os.chmod(self._dir, 0o700)

    async def close(self) -> None:
        return None

    def is_local(self, upload_id: str) -> bool:
        return node_of(upload_id)[0] == self.instance_id

    def _token(self, upload_id: str) -> str:
        instance, token = node_of(upload_id)
        if instance != self.instance_id:
            raise UploadNotFound()
        return token

    def _lock(self, token: str) -> asyncio.Lock:
        return self._locks.setdefault(token, asyncio.Lock())

    # ---- create ----------------------------------------------------------------------------
    async def create(self, who: Identity, length: int, metadata_header: str) -> Upload:
        """A new upload of ``length`` bytes to the ``path`` of the metadata, after the write
        check a PUT would make (403, 400 onto a directory, 409 under a file)."""
        if length < 0:
            raise BadRequest("invalid Upload-Length")
        if length > self.max_size:
            raise PayloadTooLarge()
        metadata = parse_metadata(metadata_header)
        raw_path = metadata.get("path")
        if not raw_path:
            raise BadRequest("Upload-Metadata needs a path entry (the destination)")
        target_path = parse_body_path(raw_path)
        if target_path.dir_form or target_path.is_root:
            raise BadRequest("the destination must be a file path")
        target = await self._check_destination(who, target_path.path)
        token = os.urandom(16).hex()
        upload = Upload(
            id=self._prefix + token,
            length=length,
            offset=0,
            owner=who.user_id,
            path=target_path.path,
            metadata=metadata_header,
            erasure=metadata.get("erasure") == "true",
            expires=self._clock() + self.expiry,
            basis=destination_basis(target),
        )
        await run_blocking(self._create_blocking, token, upload)
        log.info("upload created (%s)", shown_size(length))
        if length == 0:
            async with self._lock(token):
                upload = await self._commit(token, upload)
        return upload

    async def _check_destination(self, who: Identity, path: str) -> Entry | None:
        """The write check a PUT makes; the destination's entry."""
        target, parent = await asyncio.gather(
            self._engine.find(path), self._engine.find(parent_of(path))
        )
        check_write(who, target, parent)
        if target is not None and target.is_dir:
            raise BadRequest("path is a directory")
        if parent is not None and not parent.is_dir:
            raise ParentNotDirectory()
        return target

    # ---- read ------------------------------------------------------------------------------
    async def get(self, who: Identity, upload_id: str) -> Upload:
        """The upload as last acknowledged (HEAD); 404 unknown, 410 expired, 403 not its user.

        An upload with every byte but no commit (the answer to its last PATCH was lost: a crash,
        a 503) is committed first, as a retried PATCH would: a tus client that lost that answer
        asks HEAD, and an offset equal to the length tells it the upload is done. So HEAD
        answers only once that is true, or with the commit's error (409 when it is in doubt)."""
        token = self._token(upload_id)
        upload = await self._load(who, token)
        if not upload.complete or upload.committed:
            return upload
        lock = self._lock(token)
        async with lock:
            upload = await self._load(who, token, held=lock)
            if upload.complete and not upload.committed:
                upload = await self._commit(token, upload, again=True)
            return upload

    async def _load(self, who: Identity, token: str, held: asyncio.Lock | None = None) -> Upload:
        upload = await run_blocking(self._load_blocking, token)
        if upload is None:
            raise UploadNotFound()
        if not (who.is_admin or who.user_id == upload.owner):
            raise PermissionDenied()
        if upload.expires <= self._clock():
            lock = self._lock(token)
            if not lock.locked() or lock is held:  # never under a PATCH still writing
                await run_blocking(self._remove_blocking, token)
            raise UploadExpired()
        return upload

    # ---- append ----------------------------------------------------------------------------
    async def append(
        self,
        who: Identity,
        upload_id: str,
        offset: int,
        chunks: AsyncIterable[bytes],
        checksum: Checksum | None = None,
    ) -> Upload:
        """PATCH: write the body at ``offset`` (which must be the upload's offset: 409 else).

        With a checksum, the body counts only whole and matching (460 else, offset unchanged).
        Without one, a body cut short (the client went away, a stall) keeps what arrived: it is
        fsync'd and recorded before the error propagates. A body past the length is refused
        (413, offset unchanged). Reaching the length commits the file (``_commit``)."""
        token = self._token(upload_id)
        lock = self._lock(token)
        async with lock:
            upload = await self._load(who, token, held=lock)
            if offset != upload.offset:
                raise UploadOffsetMismatch()
            if upload.complete:
                # nothing more to take; a commit that failed earlier is retried
                async for chunk in chunks:
                    if chunk:
                        raise PayloadTooLarge()
                if upload.committed:
                    return upload
                return await self._commit(token, upload, again=True)
            current = await self._engine.find(upload.path)
            upload = replace(upload, basis=destination_basis(current))
            upload = await self._receive(token, upload, chunks, checksum)
            if upload.complete:
                upload = await self._commit(token, upload)
            return upload

    async def _receive(
        self,
        token: str,
        upload: Upload,
        chunks: AsyncIterable[bytes],
        checksum: Checksum | None,
    ) -> Upload:
        room = upload.length - upload.offset
        hasher = hashlib.new(CHECKSUM_ALGORITHMS[checksum.algorithm]) if checksum else None
        fd = await to_end(
            run_blocking(self._open_data_blocking, token, upload.offset), abandoned=os.close
        )
        written = 0
        writing = False  # a failed write leaves the file position unknown: nothing is kept
        try:
            pending: list[bytes] = []
            pending_size = 0
            try:
                async for chunk in chunks:
                    if not chunk:
                        continue
                    if written + pending_size + len(chunk) > room:
                        raise PayloadTooLarge("the body goes past Upload-Length")
                    pending.append(chunk)
                    pending_size += len(chunk)
                    if pending_size >= _WRITE_BATCH:
                        writing = True
                        await run_to_end(_write_blocking, fd, pending, hasher)
                        writing = False
                        written += pending_size
                        pending, pending_size = [], 0
                writing = True
                await run_to_end(_write_blocking, fd, pending, hasher)
                writing = False
                written += pending_size
                pending, pending_size = [], 0
            except PayloadTooLarge:
                raise
            except BaseException:  # the body broke off (client gone, stall, cancel)
                if checksum is None and not writing and written + pending_size:
                    # keep what arrived: the client resumes from the offset HEAD reports
                    saved = replace(upload, offset=upload.offset + written + pending_size)
                    await to_end(self._keep(token, fd, pending, saved))
                raise
            if hasher is not None and checksum is not None and hasher.digest() != checksum.digest:
                raise ChecksumMismatch()
            saved = replace(
                upload, offset=upload.offset + written, expires=self._clock() + self.expiry
            )
            await to_end(self._acknowledge(token, fd, saved))
            return saved
        finally:
            # After every step on ``fd`` ended (``to_end``): never under a write or fsync still
            # running in a thread. A close is no I/O wait (fsync happened above).
            os.close(fd)

    async def _keep(self, token: str, fd: int, pending: list[bytes], upload: Upload) -> None:
        await run_blocking(_write_blocking, fd, pending, None)
        await self._acknowledge(token, fd, upload)

    async def _acknowledge(self, token: str, fd: int, upload: Upload) -> None:
        """Make the bytes up to ``upload.offset`` durable, then record that offset."""
        await run_blocking(os.fsync, fd)
        await run_blocking(self._save_blocking, token, upload)

    # ---- commit ----------------------------------------------------------------------------
    async def _commit(self, token: str, upload: Upload, *, again: bool = False) -> Upload:
        """Publish the finished bytes at the destination like a PUT by the creator, then keep
        only the state (HEAD still reports the upload finished until it expires).

        ``again``: a commit after the request that completed the upload ended without one (a
        crash, a failed or lost commit), by a retried PATCH or the sweep. If an earlier commit
        was started and did not certainly fail (``trying``), it may have happened, and writes
        may have followed it. The bytes are then published only if the destination is still as
        it was when the last PATCH began (so the earlier commit did not happen); publishing them
        blindly had put them a second time over a later acknowledged write. If the destination
        now names this upload's own bytes, the earlier commit happened and the upload is done.
        Otherwise the outcome is in doubt: 409, and the upload is kept until it expires (calling
        it done could acknowledge bytes that never landed). A commit never started, or one that
        certainly failed, is simply made now."""
        who = Identity(upload.owner)
        path = parse_body_path(upload.path)
        engine = self._engine
        await run_blocking(self._check_size_blocking, token, upload.length)
        if again and upload.trying and upload.basis is not None:
            current = await engine.find(path.path)
            if destination_basis(current) != upload.basis:
                if await self._names_our_bytes(token, current):
                    return await self._committed(token, upload)
                log.warning("a finished upload's commit is in doubt; it is not made again")
                raise UploadCommitInDoubt()
        if not upload.trying:
            upload = replace(upload, trying=True)
            await run_blocking(self._save_blocking, token, upload)
        try:
            await self._publish(who, path, token, upload)
        except _MAYBE_APPLIED:
            raise
        except CallFSError:
            # a refusal: nothing was applied, and a retry (once the cause is fixed) is a plain
            # commit, not one in doubt (a review found such retries answered 409 for good)
            await run_blocking(self._save_blocking, token, replace(upload, trying=False))
            raise
        log.info("upload committed (%s)", shown_size(upload.length))
        return await self._committed(token, upload)

    async def _publish(
        self, who: Identity, path: CanonicalPath, token: str, upload: Upload
    ) -> None:
        engine = self._engine
        try:
            created = False
            if (
                upload.erasure
                and engine.settings.erasure_enabled
                and await engine.find(path.path) is None
            ):
                try:
                    await engine.create_file(who, path, self._staged(token), ErasureRequest())
                    created = True
                except AlreadyExists:
                    created = False  # created meanwhile: replace it as a PUT would
            if not created:
                await engine.put_file(who, path, self._staged(token))
        except RemoteOwner as exc:
            # the destination is another node's file (its write check passed above): send the
            # bytes there, as a PUT through this node would be proxied (§12.3)
            if engine.peers is None:
                raise
            await engine.peers.put_file(
                exc.instance_id, path.path, self._staged(token), who.user_id
            )

    async def _names_our_bytes(self, token: str, entry: Entry | None) -> bool:
        """Whether ``entry`` is this upload's earlier commit: a localfs file of this node whose
        blob is a hard link of the staged data (how localfs publishes a staged file)."""
        if entry is None or entry.is_dir or entry.blob_key is None:
            return False
        if entry.backend_type is not BackendType.LOCALFS or self._engine.is_remote(entry):
            return False
        backend = self._engine.backend(BackendType.LOCALFS.value)
        if isinstance(backend, InstrumentedBackend):
            backend = backend.inner
        if not isinstance(backend, LocalFSBackend):
            return False
        theirs = await backend.file_identity(entry.blob_key)
        try:
            ours = await run_blocking(os.stat, self._path(token, _DATA))
        except FileNotFoundError:
            return False
        return theirs == (ours.st_dev, ours.st_ino)

    async def _committed(self, token: str, upload: Upload) -> Upload:
        done = replace(upload, committed=True)
        await run_blocking(self._save_blocking, token, done)
        await run_blocking(self._drop_data_blocking, token)
        return done

    def _staged(self, token: str) -> LocalFile:
        """The finished bytes as a body: localfs links the file into a blob (no copy); other
        backends, erasure coding and a peer read it."""
        return LocalFile(self._path(token, _DATA))

    # ---- terminate and expire ----------------------------------------------------------------
    async def terminate(self, who: Identity, upload_id: str) -> None:
        """DELETE: the upload and its bytes go (404 unknown, 403 another user's, 410 expired:
        its bytes go too, as with HEAD, but there was nothing left to terminate)."""
        token = self._token(upload_id)
        async with self._lock(token):
            upload = await run_blocking(self._load_blocking, token)
            if upload is None:
                raise UploadNotFound()
            if not (who.is_admin or who.user_id == upload.owner):
                raise PermissionDenied()
            await run_blocking(self._remove_blocking, token)
        self._locks.pop(token, None)
        if upload.expires <= self._clock():
            raise UploadExpired()

    async def sweep(self) -> int:
        """Remove expired uploads (and unreadable leftovers older than the expiry); commit
        finished uploads whose commit did not happen (a crash between the last write and the
        commit). Returns how many uploads were removed."""
        now = self._clock()
        removed = 0
        for token in await run_blocking(self._tokens_blocking):
            lock = self._lock(token)
            if lock.locked():
                continue  # in use: not abandoned
            async with lock:
                try:
                    upload = await run_blocking(self._load_blocking, token)
                except (OSError, ValueError):
                    upload = None
                if upload is None:
                    if await run_blocking(self._older_blocking, token, now - self.expiry):
                        await run_blocking(self._remove_blocking, token)
                        removed += 1
                    continue
                if upload.expires <= now:
                    await run_blocking(self._remove_blocking, token)
                    removed += 1
                    self._locks.pop(token, None)
                elif upload.complete and not upload.committed:
                    try:
                        await self._commit(token, upload, again=True)
                    except Exception:
                        log.warning("a finished upload could not be committed", exc_info=True)
        if removed:
            log.info("removed %d expired uploads", removed)
        return removed

    # ---- blocking helpers ----------------------------------------------------------------
    def _path(self, token: str, name: str = "") -> str:
        base = os.path.join(self._dir, token)
        return os.path.join(base, name) if name else base

    def _create_blocking(self, token: str, upload: Upload) -> None:
        os.mkdir(self._path(token), 0o700)
        fd = os.open(
            self._path(token, _DATA), os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW, 0o600
        )
        os.close(fd)
        self._save_blocking(token, upload)
        _fsync_dir(self._dir)

    def _save_blocking(self, token: str, upload: Upload) -> None:
        state = {
            "v": 1,
            "id": upload.id,
            "length": upload.length,
            "offset": upload.offset,
            "owner": upload.owner,
            "path": upload.path,
            "metadata": upload.metadata,
            "erasure": upload.erasure,
            "expires": upload.expires,
            "committed": upload.committed,
            "trying": upload.trying,
            "basis": upload.basis,
        }
        tmp = self._path(token, _STATE + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _O_NOFOLLOW, 0o600)
        try:
            os.write(fd, json.dumps(state).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self._path(token, _STATE))
        _fsync_dir(self._path(token))

    def _load_blocking(self, token: str) -> Upload | None:
        try:
            fd = os.open(self._path(token, _STATE), os.O_RDONLY | _O_NOFOLLOW)
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            raw = b""
            while chunk := os.read(fd, 65536):
                raw += chunk
        finally:
            os.close(fd)
        try:
            state: dict[str, Any] = json.loads(raw)
            return Upload(
                id=str(state["id"]),
                length=int(state["length"]),
                offset=int(state["offset"]),
                owner=str(state["owner"]),
                path=str(state["path"]),
                metadata=str(state["metadata"]),
                erasure=bool(state["erasure"]),
                expires=float(state["expires"]),
                committed=bool(state["committed"]),
                trying=bool(state.get("trying", True)),  # older states: assume it was tried
                basis=None if state.get("basis") is None else str(state["basis"]),
            )
        except (KeyError, TypeError, ValueError) as exc:  # JSON and Unicode errors included
            raise ValueError("unreadable upload state") from exc

    def _open_data_blocking(self, token: str, offset: int) -> int:
        """The staged file open for writing at ``offset``; anything past it (bytes a crash or a
        refused PATCH left unacknowledged) is cut off first."""
        fd = os.open(self._path(token, _DATA), os.O_WRONLY | _O_NOFOLLOW)
        try:
            os.ftruncate(fd, offset)
            os.lseek(fd, offset, os.SEEK_SET)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _check_size_blocking(self, token: str, length: int) -> None:
        """The staged file holds exactly the acknowledged bytes before it is committed."""
        try:
            size = os.stat(self._path(token, _DATA), follow_symlinks=False).st_size
        except FileNotFoundError as exc:
            raise UploadNotFound("the staged bytes are missing") from exc
        if size != length:
            log.error(
                "a finished upload's staged file has %s, not %s",
                shown_size(size),
                shown_size(length),
            )
            raise InternalError()

    def _drop_data_blocking(self, token: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(token, _DATA))

    def _remove_blocking(self, token: str) -> None:
        shutil.rmtree(self._path(token), ignore_errors=True)
        _fsync_dir(self._dir)

    def _tokens_blocking(self) -> list[str]:
        try:
            with os.scandir(self._dir) as entries:
                return [
                    e.name
                    for e in entries
                    if _TOKEN.fullmatch(e.name) and e.is_dir(follow_symlinks=False)
                ]
        except FileNotFoundError:
            return []

    def _older_blocking(self, token: str, cutoff: float) -> bool:
        try:
            return os.lstat(self._path(token)).st_mtime <= cutoff
        except FileNotFoundError:
            return False


def _write_blocking(fd: int, parts: list[bytes], hasher: Any) -> None:
    """Write ``parts`` at the descriptor's position, feeding the checksum as they go."""
    for part in parts:
        if hasher is not None:
            hasher.update(part)
        view = memoryview(part)
        while view:
            view = view[os.write(fd, view) :]


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
