"""The StorageBackend seam: bytes by canonical engine path.

Every implementation (localfs, s3, replicated) passes ``callfs/tests/contract/test_storage.py``.
Paths given to a backend are canonical engine paths (``/a/b``; see ``callfs.paths``); the backend
maps them onto its own namespace and must refuse anything that lands outside it (``UnsafePath``).
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from typing import IO, Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class ObjectStat:
    size: int
    is_dir: bool
    mtime: float


@runtime_checkable
class ByteStream(Protocol):
    """An open read: yields ``length`` bytes in order, then stops. Always ``aclose()`` it.

    ``length`` is the number of bytes the stream will yield (the requested range, clamped).
    """

    length: int

    def __aiter__(self) -> AsyncIterator[bytes]: ...

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


class StagedObject(Protocol):
    """Bytes written and made durable (fsync'd / uploaded) but not yet visible at their path.

    Exactly one of ``publish`` or ``discard`` must be called. ``publish`` atomically replaces
    whatever was at the path (rename / multipart complete), creating missing parent directories.
    ``discard`` removes the staged bytes and never raises.
    """

    size: int

    async def publish(self) -> None: ...

    async def discard(self) -> None: ...


class StorageBackend(Protocol):
    """Bytes by engine path.

    Contract (each method says what it raises):
    - ``stage(path, chunks)`` consumes ``chunks`` fully into a durable temp object and returns it
      unpublished; nothing is visible at ``path`` until ``publish``. If ``chunks`` raises, the temp
      object is removed and the exception propagates unchanged.
    - ``open_read(path, offset, length)`` opens ``[offset, offset+length)`` (``length=None``: to the
      end); raises ``NotFound`` if there is no file at ``path``.
    - ``stat(path)`` returns ``None`` when nothing is there.
    - ``mkdir(path)`` creates a directory and its parents; idempotent.
    - ``delete(path)`` removes a file or an empty directory; ``NotFound`` if missing;
      ``DirectoryNotEmpty`` for a non-empty directory.
    - ``move(src, dst)`` atomically renames a file or a whole directory tree; creates dst's parents;
      replaces a file at dst; ``NotFound`` if src is missing.
    - Any path resolving outside the backend's root (symlinks included) raises ``UnsafePath``.
    """

    kind: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def stage(self, path: str, chunks: AsyncIterable[bytes]) -> StagedObject: ...

    async def open_read(
        self, path: str, offset: int = 0, length: int | None = None
    ) -> ByteStream: ...

    async def stat(self, path: str) -> ObjectStat | None: ...

    async def mkdir(self, path: str) -> None: ...

    async def delete(self, path: str) -> None: ...

    async def move(self, src: str, dst: str) -> None: ...
