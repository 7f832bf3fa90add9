"""The StorageBackend seam: immutable bytes by blob key.

Every implementation (localfs, s3) passes ``callfs/tests/contract/test_storage.py``. A backend
knows nothing of the namespace: each version of a file is a blob under a key of its own
(``new_blob_key``), named by the entry's placement record. A write never overwrites the bytes of
the version readers see; the engine switches the record in one conditional metadata command and
only then reclaims the old blob. Layout on disk: ``docs/storage-layout.md``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from typing import IO, Protocol, runtime_checkable

#: What ``stage`` accepts as upload chunks (views avoid copying blocks that are already in memory).
Chunk = bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class ObjectStat:
    size: int
    is_dir: bool
    mtime: float


@dataclass(frozen=True, slots=True)
class StoredObject:
    """One object ``list_keys`` found: its key (as ``stat``/``delete`` take it, except in the
    ``tmp`` area), its size in bytes and when it was last written (epoch seconds)."""

    key: str
    size: int
    mtime: float


#: The areas ``list_keys`` walks: blobs the backend owns, replica copies (``r/<blob key>``),
#: erasure shards (``.erasure/<upload id>/<index>``), staged leftovers of writes.
AREA_BLOBS = "blobs"
AREA_REPLICAS = "replica"
AREA_SHARDS = "shards"
AREA_TEMP = "tmp"
AREAS = (AREA_BLOBS, AREA_REPLICAS, AREA_SHARDS, AREA_TEMP)
#: Where erasure shards live in a backend (``erasure/shards.py`` writes them).
SHARD_PREFIX = ".erasure/"


@runtime_checkable
class ByteStream(Protocol):
    """An open read: yields ``length`` bytes in order, then stops. Always ``aclose()`` it.

    ``length`` is the number of bytes the stream will yield (the requested range, clamped).
    """

    length: int

    def __aiter__(self) -> AsyncIterator[Chunk]: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class LocalFileStream(ByteStream, Protocol):
    """A ByteStream backed by a local open file, so the HTTP layer can use zero-copy sendfile.

    ``fileobj`` is positioned nowhere in particular; use ``offset`` and ``length``.
    ``small_body`` is the whole range already read when it was tiny (or None).
    """

    fileobj: IO[bytes]
    offset: int
    small_body: bytes | None


#: Chunks a ``LocalFile`` is read in (one thread hop each).
LOCAL_FILE_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class LocalFile:
    """Bytes already durable in a local file that nobody changes again (a finished resumable
    upload). It iterates as body chunks; the engine hands it to ``stage_file`` instead, so a
    backend may take the file itself rather than a copy."""

    path: str

    def __aiter__(self) -> AsyncIterator[bytes]:
        return _read_local(self.path)


async def _read_local(path: str) -> AsyncIterator[bytes]:
    from callfs.concurrency import run_blocking
    from callfs.errors import NotFound

    try:
        fd = await run_blocking(os.open, path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError as exc:
        raise NotFound() from exc
    try:
        pos = 0
        while chunk := await run_blocking(os.pread, fd, LOCAL_FILE_CHUNK, pos):
            pos += len(chunk)
            yield chunk
    finally:
        os.close(fd)


def new_blob_key() -> str:
    """A fresh blob key: 128 random bits in hex. Every stored version gets its own."""
    return os.urandom(16).hex()


_HEX = "0123456789abcdef"


def is_blob_key(key: str) -> bool:
    """True for keys ``new_blob_key`` makes. Other keys are legacy namespace paths (files written
    before blob keys, whose bytes stay where they were; the stores give them as the path, leading
    ``/`` included, so a root file named like a blob key is never taken for one); the orphan
    sweep never touches those."""
    return len(key) == 32 and not key.strip(_HEX)  # strip: nothing left iff every char is hex


REPLICA_PREFIX = "r/"


def is_replica_key(key: str) -> bool:
    """A replica backend's copy of a blob (``r/<blob key>``): kept apart from the blobs the
    backend owns, so its own orphan sweep never counts a copy as an orphan."""
    return key.startswith(REPLICA_PREFIX) and is_blob_key(key[len(REPLICA_PREFIX) :])


class StagedObject(Protocol):
    """Bytes written but not yet readable under their key (localfs makes them durable at
    ``publish``, in the same fsync as the rename; S3 has them uploaded as parts).

    Exactly one of ``publish`` or ``discard`` must be called. ``publish`` makes the bytes durable
    and readable under ``key`` (rename + fsyncs / multipart complete); it never touches any other
    key. ``discard`` removes the staged bytes and never raises.
    """

    key: str
    size: int

    async def publish(self) -> None: ...

    async def discard(self) -> None: ...


async def publish_or_discard(staged: StagedObject) -> StagedObject:
    """``staged.publish()``; if it fails, the staged bytes are discarded and the error raised."""
    try:
        await staged.publish()
    except BaseException:
        await staged.discard()
        raise
    return staged


class StorageBackend(Protocol):
    """Immutable bytes by blob key (the entry's placement record names the key).

    Contract (each method says what it raises):
    - ``stage(key, chunks)`` consumes ``chunks`` fully into a durable temp object and returns it
      unpublished; nothing is readable under ``key`` until ``publish``. If ``chunks`` raises, the
      temp object is removed and the exception propagates unchanged.
    - ``stage_file(key, source)`` stages the bytes of the local file ``source`` like ``stage``
      (unpublished; ``publish``/``discard`` as usual). ``source`` is durable already and never
      changes again, and it stays where it is: localfs links it into its staging area when it is
      on the same filesystem (no copy), other backends stream it (``LocalFile``). ``NotFound`` if
      ``source`` is not a regular file.
    - ``open_read(key, offset, length)`` opens ``[offset, offset+length)`` (``length=None``: to the
      end); raises ``NotFound`` if there is no blob under ``key``. An open read keeps working if
      the blob is deleted meanwhile (localfs: the open descriptor; S3: the open GET).
    - ``stat(key)`` returns ``None`` when nothing is there.
    - ``delete(key)`` removes a blob; ``NotFound`` if missing.
    - ``list_blobs(older_than, limit)``: keys made by ``new_blob_key`` whose bytes were last
      written more than ``older_than`` seconds ago (the orphan sweep's candidates).
    - ``sweep_temp(older_than)`` removes staged leftovers of interrupted writes; returns a count.
    - ``list_keys(area, after, limit)``: one page (at most ``limit``) of what the backend holds
      in ``area`` (``AREAS``), keys strictly after ``after`` in ascending order, with sizes and
      times (fsck pages through a whole disk or bucket with it). Keys of ``blobs``,
      ``replica`` and ``shards`` are the keys ``stat``/``delete`` take; ``tmp`` keys only name
      leftovers (``sweep_temp`` removes them). ``BadRequest`` for an unknown area.
    - A key resolving outside the backend's root, or into its internal areas, raises
      ``UnsafePath`` (a write: from ``stage``, or at the latest from ``publish``, which localfs
      leaves a small body's only write to). A backend out of space raises ``InsufficientStorage``.
    """

    kind: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def stage(self, key: str, chunks: AsyncIterable[Chunk]) -> StagedObject: ...

    async def stage_file(self, key: str, source: str) -> StagedObject: ...

    async def open_read(
        self, key: str, offset: int = 0, length: int | None = None
    ) -> ByteStream: ...

    async def stat(self, key: str) -> ObjectStat | None: ...

    async def delete(self, key: str) -> None: ...

    async def list_blobs(self, older_than: float, limit: int = 10_000) -> list[str]: ...

    async def sweep_temp(self, older_than: float) -> int: ...

    async def list_keys(
        self, area: str, after: str = "", limit: int = 1000
    ) -> list[StoredObject]: ...
