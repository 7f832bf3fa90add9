"""``Client``: the blocking CallFS client, on urllib3 (already a dependency through botocore).

One ``Client`` is safe to share between threads (``callfs sync`` does): urllib3's pool hands each
request its own connection. Bodies stream both ways; nothing holds a whole file in memory.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import io
import json
import os
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO

import urllib3

if TYPE_CHECKING:
    from urllib3.response import BaseHTTPResponse

from callfs.client.errors import ClientError, TransportError, bearer, error_from_response
from callfs.client.model import (
    CHUNK,
    OFFSET_CONTENT_TYPE,
    PAGE_SIZE,
    RESUMABLE_THRESHOLD,
    TUS_CHUNK,
    TUS_VERSION,
    Entry,
    Link,
    base_url,
    directories_url,
    entry_from_headers,
    entry_from_json,
    files_url,
    normalize,
    range_header,
    read_state,
    tus_metadata,
    write_state,
)

Progress = Callable[[int], None]
"""Called with the number of bytes just transferred (a delta)."""

Source = bytes | bytearray | memoryview | str | os.PathLike[str] | BinaryIO | Iterable[bytes]

#: Link requests refused by the server's rate limit (429) retried, with a short backoff.
LINK_RETRIES = 4
#: tus PATCH failures retried (after asking the server for its offset) before giving up.
TUS_RETRIES = 5


@dataclass(frozen=True, slots=True)
class UploadResult:
    path: str
    size: int
    #: True when the bytes went through ``/v1/uploads`` (tus), False for a plain PUT.
    resumable: bool
    #: Bytes the server already had when this call started (a resumed tus upload).
    resumed_from: int = 0
    upload_url: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "size": self.size,
            "resumable": self.resumable,
            "resumed_from": self.resumed_from,
        }


class Download(io.RawIOBase):
    """A streaming GET body (a readable binary file); ``entry`` is what the headers describe.
    Close it (or use ``with``) to give the connection back."""

    def __init__(self, path: str, response: BaseHTTPResponse) -> None:
        super().__init__()
        self._resp = response
        self.entry = entry_from_headers(path, response.headers)
        self.status = response.status
        self.content_length = int(response.headers.get("Content-Length") or -1)

    def readable(self) -> bool:
        return True

    def _read(self, size: int) -> bytes:
        try:
            return self._resp.read(size)
        except urllib3.exceptions.HTTPError as exc:  # the connection broke mid-body
            raise TransportError(f"the download broke off: {type(exc).__name__}") from exc

    def readinto(self, buffer: Any) -> int:
        data = self._read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def iter_chunks(self, size: int = CHUNK) -> Iterator[bytes]:
        while chunk := self._read(size):
            yield chunk

    def close(self) -> None:
        if not self.closed:
            self._resp.release_conn()
        super().close()


def open_part(part: Path, target: Path) -> BinaryIO:
    """The part file a download is written to, beside ``target``; an error names ``target``, the
    path the user gave (it named the hidden part file)."""
    try:
        return part.open("wb")
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(target)) from None


class ResumeStore:
    """Upload URLs of unfinished tus uploads, kept in a small JSON file so that a later run (after
    Ctrl-C or a crash) continues them. The key is the server, the destination, and the local
    file's absolute path, size and mtime: a changed file starts a new upload."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    @staticmethod
    def key(server: str, remote: str, local: str | os.PathLike[str]) -> str:
        st = os.stat(local)
        raw = f"{server}|{normalize(remote)}|{os.path.abspath(local)}|{st.st_size}|{st.st_mtime_ns}"
        return hashlib.sha256(raw.encode()).hexdigest()

    def _read(self) -> dict[str, Any]:
        return read_state(self.path)

    def get(self, key: str) -> str | None:
        with self._lock:
            value = self._read().get(key)
        return str(value["upload_url"]) if isinstance(value, dict) else None

    def put(self, key: str, upload_url: str | None) -> None:
        with self._lock:
            doc = self._read()
            if upload_url is None:
                if doc.pop(key, None) is None:
                    return
            else:
                doc[key] = {"upload_url": upload_url, "created": int(time.time())}
            write_state(self.path, doc)


class _Seekable:
    """A source that can be read again from any offset (what a tus retry needs)."""

    def __init__(self, source: bytes | bytearray | memoryview | Path | BinaryIO) -> None:
        self._source = source

    def chunks(self, offset: int, length: int, progress: Progress | None) -> Iterator[bytes]:
        src = self._source
        if isinstance(src, bytes | bytearray | memoryview):
            view = memoryview(src)[offset : offset + length]
            for i in range(0, len(view), CHUNK):
                piece = bytes(view[i : i + CHUNK])
                yield piece
                if progress:
                    progress(len(piece))
            return
        with contextlib.ExitStack() as stack:
            f: IO[bytes] = stack.enter_context(src.open("rb")) if isinstance(src, Path) else src
            f.seek(offset)
            left = length
            while left > 0:
                piece = f.read(min(CHUNK, left))
                if not piece:
                    raise ClientError(0, "SOURCE_CHANGED", "the local file shrank during upload")
                left -= len(piece)
                yield piece
                if progress:
                    progress(len(piece))


class _Counted:
    """The chunks of a body of unknown size, passed on as bytes and counted as they go."""

    def __init__(self, chunks: Iterable[bytes], progress: Progress | None) -> None:
        self._chunks = chunks
        self._progress = progress
        self.sent = 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._chunks:
            if chunk:
                yield bytes(chunk)
                self.sent += len(chunk)
                if self._progress:
                    self._progress(len(chunk))


class Client:
    """Blocking client. ``url`` is a node's base URL (``http://127.0.0.1:8443``); ``api_key``
    goes in ``Authorization: Bearer``. ``verify`` is False (no TLS checks) or a CA bundle path.

    Every method raises ``ClientError`` (``TransportError`` when no answer came)."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        verify: bool | str = True,
        max_connections: int = 16,
    ) -> None:
        self.url = base_url(url)
        headers = {"User-Agent": "callfs-client"}
        if api_key:
            headers["Authorization"] = bearer(api_key)
        tls: dict[str, Any] = {}
        if verify is False:
            tls["cert_reqs"] = "CERT_NONE"
        elif isinstance(verify, str):
            tls["ca_certs"] = verify
        self._http = urllib3.PoolManager(
            num_pools=4,
            maxsize=max_connections,
            timeout=urllib3.Timeout(connect=min(timeout, 10.0), read=timeout),
            retries=False,
            **tls,
        )
        self._headers = headers  # urllib3 replaces (not merges) pool headers: sent by hand
        self._tus: bool | None = None

    def close(self) -> None:
        self._http.clear()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- transport -----------------------------------------------------------------------
    def _request(
        self,
        method: str,
        url: str,
        *,
        ok: tuple[int, ...] = (200,),
        body: Any = None,
        headers: dict[str, str] | None = None,
        stream: bool = False,
    ) -> BaseHTTPResponse:
        try:
            resp = self._http.request(
                method,
                url,
                body=body,
                headers={**self._headers, **(headers or {})},
                preload_content=not stream,
                redirect=False,
            )
        except urllib3.exceptions.HTTPError as exc:
            raise TransportError(f"{method} {url}: {exc}") from exc
        if resp.status not in ok:
            raw = resp.data if method != "HEAD" else b""
            resp.release_conn()
            raise error_from_response(resp.status, raw, resp.headers.get("X-Request-ID"))
        return resp

    def _json(self, method: str, url: str, **kw: Any) -> Any:
        resp = self._request(method, url, **kw)
        try:
            return json.loads(resp.data) if resp.data else None
        except ValueError as exc:
            raise ClientError(resp.status, "BAD_RESPONSE", "the answer is not JSON") from exc

    # ---- metadata ------------------------------------------------------------------------
    def stat(self, path: str) -> Entry:
        """``HEAD``: the entry at ``path`` (404 ``FILE_NOT_FOUND`` when missing)."""
        resp = self._request("HEAD", files_url(self.url, path))
        return entry_from_headers(path, resp.headers)

    def exists(self, path: str) -> bool:
        try:
            self.stat(path)
        except ClientError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def list(
        self,
        path: str = "/",
        *,
        recursive: bool = False,
        max_depth: int | None = None,
        page_size: int = PAGE_SIZE,
    ) -> Iterator[Entry]:
        """The entries under ``path``, fetched a page at a time (``limit``/``after``/``next``).
        A recursive listing is one request (the server does not page those)."""
        url = directories_url(self.url, path)
        if recursive:
            depth = "" if max_depth is None else f"&max_depth={max_depth}"
            doc = self._json("GET", f"{url}?recursive=true{depth}")
            yield from (entry_from_json(i) for i in doc.get("items") or [])
            return
        after: str | None = None
        while True:
            query = f"?limit={page_size}"
            if after is not None:
                query += "&after=" + urllib.parse.quote(after, safe="")
            doc = self._json("GET", url + query)
            yield from (entry_from_json(i) for i in doc.get("items") or [])
            after = doc.get("next")
            if not after:
                return

    def listdir(self, path: str = "/", **kw: Any) -> builtins.list[Entry]:
        return list(self.list(path, **kw))

    # ---- reading -------------------------------------------------------------------------
    def open(self, path: str, start: int = 0, end: int | None = None) -> Download:
        """A streaming read of ``path`` (bytes ``start`` to ``end``, exclusive, when given;
        a negative ``start`` without ``end`` is the last ``-start`` bytes)."""
        headers = {} if start == 0 and end is None else {"Range": range_header(start, end)}
        resp = self._request(
            "GET", files_url(self.url, path), ok=(200, 206), headers=headers, stream=True
        )
        if resp.headers.get("X-CallFS-Type") == "directory":
            resp.release_conn()
            raise ClientError(400, "IS_A_DIRECTORY", f"{normalize(path)} is a directory")
        return Download(path, resp)

    def read(self, path: str, start: int = 0, end: int | None = None) -> bytes:
        """The bytes of ``path`` (or of a range, as in ``open``); an empty range gives b""."""
        if end is not None and end <= start and start >= 0:
            return b""
        try:
            with self.open(path, start, end) as f:
                return f.read()
        except ClientError as exc:
            if exc.status == 416:
                return b""
            raise

    def download(
        self, path: str, local: str | os.PathLike[str], *, progress: Progress | None = None
    ) -> Entry:
        """Stream ``path`` into the local file (written beside it, then renamed into place)."""
        target = Path(local)
        part = target.with_name(f".{target.name}.callfs-part")
        with self.open(path) as f:
            try:
                with open_part(part, target) as out:
                    for chunk in f.iter_chunks():
                        out.write(chunk)
                        if progress:
                            progress(len(chunk))
                os.replace(part, target)
            except BaseException:
                part.unlink(missing_ok=True)
                raise
            return f.entry

    # ---- writing -------------------------------------------------------------------------
    def supports_tus(self) -> bool:
        """Whether the server answers ``OPTIONS /v1/uploads`` with ``Tus-Resumable: 1.0.0``
        (asked once per client)."""
        if self._tus is None:
            try:
                resp = self._request("OPTIONS", f"{self.url}/v1/uploads", ok=(200, 204))
                self._tus = resp.headers.get("Tus-Resumable") == TUS_VERSION
            except ClientError:
                self._tus = False
        return self._tus

    def upload(
        self,
        path: str,
        source: Source,
        *,
        size: int | None = None,
        resumable: bool | None = None,
        chunk_size: int = TUS_CHUNK,
        progress: Progress | None = None,
        upload_url: str | None = None,
        on_upload_url: Callable[[str | None], None] | None = None,
        overwrite: bool = True,
    ) -> UploadResult:
        """Create or replace ``path`` with ``source``: bytes, a local file path, a binary file
        object, or an iterable of byte chunks (sent chunked, size unknown).

        ``resumable``: True forces tus, False forces a plain PUT, None (default) uses tus for
        seekable sources of at least 16 MiB when the server offers it. A tus upload survives
        broken connections (it asks the server's offset and goes on); ``upload_url`` continues
        an earlier one, and ``on_upload_url`` is told the URL once it exists (and None when
        the upload completed) so that the caller can keep it for a later run. ``overwrite``
        False sends a plain POST, which fails with 409 ``FILE_ALREADY_EXISTS`` instead of
        replacing an existing file."""
        seekable: _Seekable | None = None
        if isinstance(source, str | os.PathLike):
            local = Path(source)
            size = local.stat().st_size
            seekable = _Seekable(local)
        elif isinstance(source, bytes | bytearray | memoryview):
            size = len(source)
            seekable = _Seekable(source)
        elif hasattr(source, "read"):
            fobj: BinaryIO = source  # type: ignore[assignment]
            if size is None and fobj.seekable():
                here = fobj.tell()
                size = fobj.seek(0, os.SEEK_END) - here
                fobj.seek(here)
            if fobj.seekable() and fobj.tell() == 0:
                seekable = _Seekable(fobj)
        use_tus = resumable if overwrite else False
        if use_tus is None:
            use_tus = (
                seekable is not None
                and size is not None
                and size >= RESUMABLE_THRESHOLD
                and self.supports_tus()
            )
        elif use_tus and not self.supports_tus():
            raise ClientError(0, "TUS_UNSUPPORTED", "the server has no /v1/uploads (tus)")
        if use_tus:
            if seekable is None or size is None:
                raise ClientError(0, "BAD_SOURCE", "a resumable upload needs a seekable source")
            return self._tus_upload(
                path, seekable, size, chunk_size, progress, upload_url, on_upload_url
            )
        return self._put(path, source, seekable, size, progress, "PUT" if overwrite else "POST")

    def _put(
        self,
        path: str,
        source: Source,
        seekable: _Seekable | None,
        size: int | None,
        progress: Progress | None,
        method: str,
    ) -> UploadResult:
        headers = {"Content-Type": "application/octet-stream"}
        body: Iterable[bytes]
        if seekable is not None and size is not None:
            body = seekable.chunks(0, size, progress)
            headers["Content-Length"] = str(size)
        elif hasattr(source, "read"):
            fobj: BinaryIO = source  # type: ignore[assignment]
            body = _Counted(iter(lambda: fobj.read(CHUNK), b""), progress)
            if size is not None:
                headers["Content-Length"] = str(size)
        else:
            body = _Counted(source, progress)  # type: ignore[arg-type]
        self._put_request(method, path, body, headers, chunked="Content-Length" not in headers)
        if size is None and isinstance(body, _Counted):
            size = body.sent  # a chunked body: its size is what went out
        return UploadResult(normalize(path), -1 if size is None else size, False)

    def _put_request(
        self,
        method: str,
        path: str,
        body: Iterable[bytes],
        headers: dict[str, str],
        chunked: bool,
    ) -> None:
        url = files_url(self.url, path)
        try:
            resp = self._http.request(
                method,
                url,
                body=body,
                headers={**self._headers, **headers},
                chunked=chunked,
                redirect=False,
            )
        except urllib3.exceptions.HTTPError as exc:
            raise TransportError(f"{method} {url}: {exc}") from exc
        if resp.status not in (200, 201):
            raise error_from_response(resp.status, resp.data, resp.headers.get("X-Request-ID"))

    # ---- tus -----------------------------------------------------------------------------
    def tus_create(self, path: str, length: int) -> str:
        """``POST /v1/uploads``: a new upload of ``length`` bytes to ``path``; its URL."""
        resp = self._request(
            "POST",
            f"{self.url}/v1/uploads",
            ok=(201,),
            headers={
                "Tus-Resumable": TUS_VERSION,
                "Upload-Length": str(length),
                "Upload-Metadata": tus_metadata(path),
            },
        )
        location = resp.headers.get("Location") or ""
        if not location:
            raise ClientError(201, "BAD_RESPONSE", "upload created without a Location")
        return location if "://" in location else self.url + location

    def tus_offset(self, upload_url: str) -> int:
        """``HEAD``: the bytes the server has acknowledged."""
        return self.tus_status(upload_url)[0]

    def tus_status(self, upload_url: str) -> tuple[int, int]:
        """``HEAD``: (bytes acknowledged, declared length)."""
        resp = self._request("HEAD", upload_url, headers={"Tus-Resumable": TUS_VERSION})
        return int(resp.headers.get("Upload-Offset") or 0), int(
            resp.headers.get("Upload-Length") or -1
        )

    def tus_terminate(self, upload_url: str) -> None:
        self._request("DELETE", upload_url, ok=(204,), headers={"Tus-Resumable": TUS_VERSION})

    def _tus_patch(self, upload_url: str, offset: int, body: Iterable[bytes], n: int) -> int:
        headers = {
            "Tus-Resumable": TUS_VERSION,
            "Upload-Offset": str(offset),
            "Content-Type": OFFSET_CONTENT_TYPE,
            "Content-Length": str(n),
        }
        resp = self._request("PATCH", upload_url, ok=(204,), body=body, headers=headers)
        return int(resp.headers.get("Upload-Offset") or offset + n)

    def _tus_upload(
        self,
        path: str,
        source: _Seekable,
        size: int,
        chunk_size: int,
        progress: Progress | None,
        upload_url: str | None,
        on_upload_url: Callable[[str | None], None] | None,
    ) -> UploadResult:
        offset = 0
        if upload_url is not None:
            try:
                offset, length = self.tus_status(upload_url)
                if length != size:  # another upload's URL: start a new one
                    upload_url = None
            except ClientError as exc:
                if exc.status not in (403, 404, 410):
                    raise
                upload_url = None  # expired or gone: start again
        if upload_url is None:
            upload_url = self.tus_create(path, size)
            offset = 0
            if on_upload_url:
                on_upload_url(upload_url)
        resumed_from = offset
        if progress and offset:
            progress(offset)
        failures = 0
        sent = 0  # bytes of the current PATCH the progress bar has been told of
        stale = False  # a PATCH failed: ask the server's offset (HEAD) before going on

        def counted(k: int) -> None:
            nonlocal sent
            sent += k
            if progress:
                progress(k)

        while offset < size or stale:
            try:
                if stale:
                    # retried like the PATCH: the server may be down a while (a restart)
                    shown, offset = offset + sent, self.tus_offset(upload_url)
                    stale, sent = False, 0
                    if progress and offset != shown:
                        progress(offset - shown)
                    continue
                n = min(chunk_size, size - offset)
                sent = 0
                offset = self._tus_patch(upload_url, offset, source.chunks(offset, n, counted), n)
                sent = failures = 0
            except ClientError as exc:
                retry = isinstance(exc, TransportError) or exc.status in (409, 502, 503, 500)
                failures += 1
                if not retry or failures > TUS_RETRIES:
                    raise
                time.sleep(min(0.5 * 2**failures, 10.0))
                stale = True
        if on_upload_url:
            on_upload_url(None)
        return UploadResult(normalize(path), size, True, resumed_from, upload_url)

    def upload_file(
        self,
        local: str | os.PathLike[str],
        path: str,
        *,
        resumable: bool | None = None,
        chunk_size: int = TUS_CHUNK,
        progress: Progress | None = None,
        resume_store: ResumeStore | None = None,
    ) -> UploadResult:
        """``upload`` of a local file; with a ``resume_store``, an interrupted resumable upload
        of the same unchanged file to the same place continues where the server left off."""
        small = resumable is None and os.path.getsize(local) < RESUMABLE_THRESHOLD
        if resume_store is None or resumable is False or small:
            return self.upload(
                path, local, resumable=resumable, chunk_size=chunk_size, progress=progress
            )
        key = ResumeStore.key(self.url, path, local)

        def remember(url: str | None) -> None:
            resume_store.put(key, url)

        return self.upload(
            path,
            local,
            resumable=resumable,
            chunk_size=chunk_size,
            progress=progress,
            upload_url=resume_store.get(key),
            on_upload_url=remember,
        )

    # ---- namespace -----------------------------------------------------------------------
    def mkdir(self, path: str) -> bool:
        """Create the directory and any missing parents; False if it already existed."""
        resp = self._request("POST", files_url(self.url, path, directory=True), ok=(200, 201))
        return resp.status == 201

    def move(
        self, src: str, dst: str, *, overwrite: bool = False, create_parents: bool = False
    ) -> str:
        """``PATCH`` with ``destination``; the new path."""
        body = {
            "destination": normalize(dst),
            "overwrite": overwrite,
            "create_parents": create_parents,
        }
        return self._patch(src, body)

    def rename(self, path: str, name: str) -> str:
        """Rename in place (``name`` is the new last element); the new path."""
        return self._patch(path, {"name": name})

    def _patch(self, path: str, body: dict[str, Any]) -> str:
        doc = self._json(
            "PATCH",
            files_url(self.url, path),
            body=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        return str(doc["path"])

    def delete(self, path: str, *, recursive: bool = False) -> None:
        url = files_url(self.url, path) + ("?recursive=true" if recursive else "")
        self._request("DELETE", url, ok=(204,))

    def share(self, path: str, expiry_seconds: int = 3600) -> Link:
        """A single-use download link for a file (1..86400 seconds)."""
        body = json.dumps({"path": normalize(path), "expiry_seconds": expiry_seconds}).encode()
        for attempt in range(LINK_RETRIES + 1):
            try:
                doc = self._json(
                    "POST",
                    f"{self.url}/v1/links/generate",
                    ok=(200, 201),
                    body=body,
                    headers={"Content-Type": "application/json"},
                )
                break
            except ClientError as exc:  # 429: the server allows ~100 links/s per IP, burst 1
                if exc.status != 429 or attempt == LINK_RETRIES:
                    raise
                time.sleep(0.05 * 2**attempt)
        return Link(url=str(doc["url"]), token=str(doc["token"]), expires=str(doc["expires"]))
