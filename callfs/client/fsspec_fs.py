"""``CallFSFileSystem``: CallFS as an fsspec filesystem (the only importer of fsspec).

``callfs://HOST:PORT/path`` speaks http, ``callfs+https://HOST/path`` https; ``callfs:///path``
(no host) takes the server from the ``base_url`` storage option, else ``CALLFS_URL``. The key is
the ``api_key`` storage option, else ``CALLFS_API_KEY``. Registered under these protocols by the
``fsspec.specs`` entry points of setup.cfg, so ``fsspec.open("callfs://...")`` and
``pandas.read_csv("callfs://...")`` find it once the package is installed.

Reads are random access: ``_fetch_range`` asks for one HTTP Range per block. Writes stream: the
first flush starts one chunked PUT in a worker thread, each later block feeds it, and ``close``
ends it; a discarded file (an exception inside ``with``) aborts the PUT so nothing is stored.
"""

from __future__ import annotations

import datetime as dt
import os
import queue
import threading
import urllib.parse
from collections.abc import Iterator
from typing import Any, ClassVar

from fsspec.spec import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
    AbstractBufferedFile,
    AbstractFileSystem,
)

from callfs.client.errors import ClientError
from callfs.client.model import Entry, normalize
from callfs.client.sync import Client

SCHEMES = {"callfs": "http", "callfs+http": "http", "callfs+https": "https"}


def os_error(exc: ClientError, path: str) -> OSError:
    """The ``OSError`` subclass fsspec callers expect for a server error."""
    if exc.status == 404:
        return FileNotFoundError(2, exc.message, path)
    if exc.status in (401, 403):
        return PermissionError(13, exc.message, path)
    if exc.code == "FILE_ALREADY_EXISTS":
        return FileExistsError(17, exc.message, path)
    if exc.code == "DIRECTORY_NOT_EMPTY":
        return OSError(39, exc.message, path)
    if exc.code == "IS_A_DIRECTORY":
        return IsADirectoryError(21, exc.message, path)
    if "not a directory" in exc.message:
        return NotADirectoryError(20, exc.message, path)
    return OSError(f"{exc.code}: {exc.message} (HTTP {exc.status}): {path}")


def _info(entry: Entry) -> dict[str, Any]:
    return {
        "name": entry.path,
        "size": entry.size,
        "type": entry.type,
        "mode": entry.mode,
        "owner": entry.owner,
        "mtime": entry.mtime_epoch,
        "created": entry.mtime_epoch,
    }


class CallFSFileSystem(AbstractFileSystem):  # type: ignore[misc]
    """fsspec filesystem over one CallFS node. Paths are absolute (``/dir/file``)."""

    protocol: ClassVar[tuple[str, ...]] = tuple(SCHEMES)
    root_marker = "/"

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        verify: bool | str = True,
        timeout: float = 60.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        url = base_url or os.environ.get("CALLFS_URL")
        if not url:
            raise ValueError(
                "no CallFS server: use callfs://HOST:PORT/path, the base_url storage option "
                "or CALLFS_URL"
            )
        key = api_key if api_key is not None else os.environ.get("CALLFS_API_KEY")
        self.client = Client(url, key, verify=verify, timeout=timeout)
        self.base_url = self.client.url

    # ---- URLs ----------------------------------------------------------------------------
    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        path = str(path)
        for scheme in sorted(SCHEMES, key=len, reverse=True):
            if path.startswith(scheme + "://"):
                rest = path[len(scheme) + 3 :]
                path = "/" + rest.split("/", 1)[1] if "/" in rest else "/"
                break
        return normalize(path)

    @staticmethod
    def _get_kwargs_from_urls(path: str) -> dict[str, Any]:
        scheme, sep, rest = path.partition("://")
        if not sep or scheme not in SCHEMES:
            return {}
        host = rest.split("/", 1)[0]
        return {"base_url": f"{SCHEMES[scheme]}://{host}"} if host else {}

    def unstrip_protocol(self, name: str) -> str:
        parsed = urllib.parse.urlsplit(self.base_url)
        scheme = "callfs+https" if parsed.scheme == "https" else "callfs"
        return f"{scheme}://{parsed.netloc}{self._strip_protocol(name)}"

    # ---- metadata ------------------------------------------------------------------------
    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        path = self._strip_protocol(path)
        try:
            return _info(self.client.stat(path))
        except ClientError as exc:
            raise os_error(exc, path) from exc

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        path = self._strip_protocol(path)
        try:
            entries = list(self.client.list(path))
        except ClientError as exc:
            if exc.status == 400:  # a file: fsspec lists it as itself
                info = self.info(path)
                return [info] if detail else [info["name"]]
            raise os_error(exc, path) from exc
        if detail:
            return [_info(e) for e in entries]
        return [e.path for e in entries]

    def modified(self, path: str) -> dt.datetime:
        stamp = self.info(path)["mtime"]
        if stamp is None:
            raise OSError(f"no modification time for {path}")
        return dt.datetime.fromtimestamp(stamp, tz=dt.UTC)

    created = modified

    # ---- namespace -----------------------------------------------------------------------
    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        path = self._strip_protocol(path)
        if not create_parents and not self.exists(self._parent(path)):
            raise FileNotFoundError(2, "parent directory does not exist", path)
        try:
            created = self.client.mkdir(path)
        except ClientError as exc:
            raise os_error(exc, path) from exc
        if not created:
            raise FileExistsError(17, "directory exists", path)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        try:
            self.mkdir(path, create_parents=True)
        except FileExistsError:
            if not exist_ok:
                raise

    def rmdir(self, path: str) -> None:
        self._delete(path, recursive=False)

    def rm_file(self, path: str) -> None:
        self._delete(path, recursive=False)

    def _rm(self, path: str) -> None:
        self._delete(path, recursive=False)

    def rm(self, path: Any, recursive: bool = False, maxdepth: int | None = None) -> None:
        """A server-side recursive delete per path (globs and ``maxdepth`` go through fsspec's
        expansion)."""
        paths = path if isinstance(path, list) else [path]
        if maxdepth is not None or any(self._has_magic(p) for p in paths):
            super().rm(path, recursive=recursive, maxdepth=maxdepth)
            return
        for p in paths:
            self._delete(p, recursive=recursive)

    @staticmethod
    def _has_magic(path: str) -> bool:
        return any(c in str(path) for c in "*?[")

    def _delete(self, path: str, recursive: bool) -> None:
        path = self._strip_protocol(path)
        try:
            self.client.delete(path, recursive=recursive)
        except ClientError as exc:
            raise os_error(exc, path) from exc

    def mv(
        self,
        path1: Any,
        path2: Any,
        recursive: bool = False,
        maxdepth: int | None = None,
        **kwargs: Any,
    ) -> None:
        """A server-side move (replaces an existing file, creates missing parents). Into an
        existing directory (or a path ending in ``/``) it goes inside it, under its own name,
        as fsspec's ``mv`` and ``cp`` do (it failed: "destination exists with another type")."""
        if isinstance(path1, list) or self._has_magic(path1):
            super().mv(path1, path2, recursive=recursive, maxdepth=maxdepth, **kwargs)
            return
        src, dst = self._strip_protocol(path1), self._strip_protocol(path2)
        if str(path2).endswith("/") or (dst != src and self.isdir(dst)):
            dst = f"{dst.rstrip('/')}/{src.rstrip('/').rsplit('/', 1)[-1]}"
        try:
            self.client.move(src, dst, overwrite=True, create_parents=True)
        except ClientError as exc:
            raise os_error(exc, src) from exc

    # ---- bytes ---------------------------------------------------------------------------
    def cat_file(
        self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any
    ) -> bytes:
        path = self._strip_protocol(path)
        if (start is not None and start < 0) or (end is not None and end < 0):
            size = self.info(path)["size"]
            start = size + start if start is not None and start < 0 else start
            end = size + end if end is not None and end < 0 else end
        try:
            return self.client.read(path, max(start or 0, 0), end)
        except ClientError as exc:
            raise os_error(exc, path) from exc

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        path = self._strip_protocol(path)
        try:
            self.client.upload(path, value, overwrite=mode != "create")
        except ClientError as exc:
            raise os_error(exc, path) from exc

    def put_file(self, lpath: str, rpath: str, callback: Any = None, **kwargs: Any) -> None:
        rpath = self._strip_protocol(rpath)
        try:
            if os.path.isdir(lpath):
                self.client.mkdir(rpath)
                return
            progress = None
            if callback is not None:
                callback.set_size(os.path.getsize(lpath))
                progress = callback.relative_update
            self.client.upload(rpath, lpath, progress=progress)
        except ClientError as exc:
            raise os_error(exc, rpath) from exc

    def get_file(self, rpath: str, lpath: str, callback: Any = None, **kwargs: Any) -> None:
        rpath = self._strip_protocol(rpath)
        try:
            progress = callback.relative_update if callback is not None else None
            if hasattr(lpath, "write"):  # a file object
                with self.client.open(rpath) as f:
                    for chunk in f.iter_chunks():
                        lpath.write(chunk)
                        if progress:
                            progress(len(chunk))
                return
            if self.isdir(rpath):
                os.makedirs(lpath, exist_ok=True)
                return
            os.makedirs(os.path.dirname(os.path.abspath(lpath)), exist_ok=True)
            self.client.download(rpath, lpath, progress=progress)
        except ClientError as exc:
            raise os_error(exc, rpath) from exc

    def cp_file(self, path1: str, path2: str, **kwargs: Any) -> None:
        """Copy through the client (streamed: the server has no copy operation)."""
        src, dst = self._strip_protocol(path1), self._strip_protocol(path2)
        try:
            if self.isdir(src):
                self.client.mkdir(dst)
                return
            with self.client.open(src) as f:
                self.client.upload(dst, f.iter_chunks())
        except ClientError as exc:
            raise os_error(exc, src) from exc

    def _open(
        self,
        path: str,
        mode: str = "rb",
        block_size: int | str | None = None,
        autocommit: bool = True,
        cache_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> CallFSFile:
        if "a" in mode:  # refused now, not at close (the data written was silently lost)
            raise NotImplementedError("CallFS files cannot be appended to")
        if "x" in mode and self.exists(path):
            raise FileExistsError(17, "file exists", self._strip_protocol(path))
        return CallFSFile(
            self,
            self._strip_protocol(path),
            mode=mode,
            block_size=block_size or "default",
            autocommit=autocommit,
            cache_options=cache_options,
            **kwargs,
        )


_END = object()


class CallFSFile(AbstractBufferedFile):  # type: ignore[misc]
    """A file of ``CallFSFileSystem``: ranged reads, one streamed PUT for writes."""

    fs: CallFSFileSystem

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.mode == "rb" and self.details.get("type") == "directory":
            # (read as b"" before; cat_file refuses a directory too)
            raise IsADirectoryError(21, "is a directory", self.path)

    def _fetch_range(self, start: int, end: int) -> bytes:
        if start >= end:
            return b""
        try:
            return self.fs.client.read(self.path, start, end)
        except ClientError as exc:
            raise os_error(exc, self.path) from exc

    # ---- writing -------------------------------------------------------------------------
    def _initiate_upload(self) -> None:  # (appending is refused by ``_open``)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=4)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._put, name="callfs-fsspec-put", daemon=True)
        self._thread.start()

    def _body(self) -> Iterator[bytes]:
        while True:
            item = self._queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def _put(self) -> None:
        try:
            exclusive = "x" in self.mode  # POST: never replaces (409 when it exists)
            self.fs.client.upload(self.path, self._body(), resumable=False, overwrite=not exclusive)
        except BaseException as exc:
            self._error = exc

    def _feed(self, item: object) -> None:
        while True:
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                if not self._thread.is_alive():
                    self._raise()
                    raise OSError(f"upload of {self.path} stopped") from None

    def _raise(self) -> None:
        if isinstance(self._error, ClientError):
            raise os_error(self._error, self.path) from self._error
        if self._error is not None:
            raise OSError(f"upload of {self.path} failed: {self._error}") from self._error

    def _upload_chunk(self, final: bool = False) -> bool:
        data = self.buffer.getvalue()
        if data:
            self._feed(data)
        if final:
            self._feed(_END)
            self._thread.join()
            self._raise()
        return True

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None and self.mode != "rb" and not self.closed:  # type: ignore[has-type]
            self.discard()  # fsspec would commit what was written so far
            self.closed = True
            return
        self.close()

    def discard(self) -> None:
        """Abort the PUT (called on an exception inside ``with``): nothing is stored."""
        thread = getattr(self, "_thread", None)
        if thread is not None and thread.is_alive():
            self._feed(ConnectionAbortedError("write discarded"))
            thread.join()
        super().discard()
