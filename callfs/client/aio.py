"""``AsyncClient``: the asyncio CallFS client, on aiohttp. Same operations as ``Client``.

Local file reads and writes hop to a worker thread (``asyncio.to_thread``) so that the loop never
blocks on the disk.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import os
import urllib.parse
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

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
    tus_metadata,
)
from callfs.client.sync import LINK_RETRIES, TUS_RETRIES, Progress, UploadResult, open_part

AsyncSource = (
    bytes | bytearray | memoryview | str | os.PathLike[str] | AsyncIterable[bytes] | Iterable[bytes]
)


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    headers: Mapping[str, str]
    body: bytes


class AsyncDownload:
    """A streaming GET body: ``async for chunk in d.iter_chunks()``, or ``await d.read()``."""

    def __init__(self, path: str, response: aiohttp.ClientResponse) -> None:
        self._resp = response
        self.entry = entry_from_headers(path, response.headers)
        self.status = response.status
        self.content_length = response.content_length

    async def iter_chunks(self, size: int = CHUNK) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._resp.content.iter_chunked(size):
                yield chunk
        except (TimeoutError, aiohttp.ClientError) as exc:  # broke off mid-body
            raise TransportError(f"the download broke off: {type(exc).__name__}") from exc

    async def read(self) -> bytes:
        try:
            return await self._resp.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise TransportError(f"the download broke off: {type(exc).__name__}") from exc

    def close(self) -> None:
        self._resp.release()


async def _file_chunks(
    path: Path, offset: int, length: int, progress: Progress | None
) -> AsyncIterator[bytes]:
    f = await asyncio.to_thread(path.open, "rb")
    try:
        await asyncio.to_thread(f.seek, offset)
        left = length
        while left > 0:
            piece = await asyncio.to_thread(f.read, min(CHUNK, left))
            if not piece:
                raise ClientError(0, "SOURCE_CHANGED", "the local file shrank during upload")
            left -= len(piece)
            yield piece
            if progress:
                progress(len(piece))
    finally:
        await asyncio.to_thread(f.close)


async def _bytes_chunks(
    data: bytes | bytearray | memoryview, offset: int, length: int, progress: Progress | None
) -> AsyncIterator[bytes]:
    view = memoryview(data)[offset : offset + length]
    for i in range(0, len(view), CHUNK):
        piece = bytes(view[i : i + CHUNK])
        yield piece
        if progress:
            progress(len(piece))


async def _iter_chunks(
    source: AsyncIterable[bytes] | Iterable[bytes], progress: Progress | None
) -> AsyncIterator[bytes]:
    if isinstance(source, AsyncIterable):
        async for chunk in source:
            yield bytes(chunk)
            if progress:
                progress(len(chunk))
    else:
        for chunk in source:
            yield bytes(chunk)
            if progress:
                progress(len(chunk))


class AsyncClient:
    """Asyncio client; use ``async with AsyncClient(url, key) as c:`` (or ``await c.close()``).
    Every method raises ``ClientError`` (``TransportError`` when no answer came)."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        verify: bool = True,
        max_connections: int = 16,
    ) -> None:
        self.url = base_url(url)
        self._headers = {"User-Agent": "callfs-client"}
        if api_key:
            self._headers["Authorization"] = bearer(api_key)
        self._timeout = aiohttp.ClientTimeout(total=None, connect=10.0, sock_read=timeout)
        self._verify = verify
        self._limit = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._tus: bool | None = None

    def _s(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self._limit, ssl=self._verify)
            self._session = aiohttp.ClientSession(
                headers=self._headers, timeout=self._timeout, connector=connector
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # ---- transport -----------------------------------------------------------------------
    async def _open_response(
        self, method: str, url: str, *, ok: tuple[int, ...], **kw: Any
    ) -> aiohttp.ClientResponse:
        """The response with its body unread (an error answer raises ``ClientError``)."""
        try:
            resp = await self._s().request(method, url, allow_redirects=False, **kw)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise TransportError(f"{method} {url}: {exc!r}") from exc
        if resp.status not in ok:
            try:
                raw = await resp.read() if method != "HEAD" else b""
            except aiohttp.ClientError:
                raw = b""
            finally:
                resp.release()
            raise error_from_response(resp.status, raw, resp.headers.get("X-Request-ID"))
        return resp

    async def _request(
        self, method: str, url: str, *, ok: tuple[int, ...] = (200,), **kw: Any
    ) -> _Answer:
        resp = await self._open_response(method, url, ok=ok, **kw)
        try:
            body = await resp.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise TransportError(f"{method} {url}: {exc!r}") from exc
        finally:
            resp.release()
        return _Answer(resp.status, resp.headers, body)

    async def _json(self, method: str, url: str, **kw: Any) -> Any:
        answer = await self._request(method, url, **kw)
        try:
            return json.loads(answer.body or b"null")
        except ValueError as exc:
            raise ClientError(answer.status, "BAD_RESPONSE", "the answer is not JSON") from exc

    # ---- metadata ------------------------------------------------------------------------
    async def stat(self, path: str) -> Entry:
        resp = await self._request("HEAD", files_url(self.url, path))
        return entry_from_headers(path, resp.headers)

    async def exists(self, path: str) -> bool:
        try:
            await self.stat(path)
        except ClientError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def list(
        self,
        path: str = "/",
        *,
        recursive: bool = False,
        max_depth: int | None = None,
        page_size: int = PAGE_SIZE,
    ) -> AsyncIterator[Entry]:
        """Entries under ``path``, a page at a time (recursive listings are one request)."""
        url = directories_url(self.url, path)
        if recursive:
            depth = "" if max_depth is None else f"&max_depth={max_depth}"
            doc = await self._json("GET", f"{url}?recursive=true{depth}")
            for item in doc.get("items") or []:
                yield entry_from_json(item)
            return
        after: str | None = None
        while True:
            query = f"?limit={page_size}"
            if after is not None:
                query += "&after=" + urllib.parse.quote(after, safe="")
            doc = await self._json("GET", url + query)
            for item in doc.get("items") or []:
                yield entry_from_json(item)
            after = doc.get("next")
            if not after:
                return

    async def listdir(self, path: str = "/", **kw: Any) -> builtins.list[Entry]:
        return [e async for e in self.list(path, **kw)]

    # ---- reading -------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def open(
        self, path: str, start: int = 0, end: int | None = None
    ) -> AsyncIterator[AsyncDownload]:
        """``async with c.open(path, start, end) as d:`` a streaming read (``end`` exclusive)."""
        headers = {} if start == 0 and end is None else {"Range": range_header(start, end)}
        resp = await self._open_response(
            "GET", files_url(self.url, path), ok=(200, 206), headers=headers
        )
        download = AsyncDownload(path, resp)
        try:
            if download.entry.is_dir:
                raise ClientError(400, "IS_A_DIRECTORY", f"{normalize(path)} is a directory")
            yield download
        finally:
            download.close()

    async def read(self, path: str, start: int = 0, end: int | None = None) -> bytes:
        if end is not None and end <= start and start >= 0:
            return b""
        try:
            async with self.open(path, start, end) as d:
                return await d.read()
        except ClientError as exc:
            if exc.status == 416:
                return b""
            raise

    async def download(
        self, path: str, local: str | os.PathLike[str], *, progress: Progress | None = None
    ) -> Entry:
        target = Path(local)
        part = target.with_name(f".{target.name}.callfs-part")
        async with self.open(path) as d:
            out = await asyncio.to_thread(open_part, part, target)
            try:
                async for chunk in d.iter_chunks():
                    await asyncio.to_thread(out.write, chunk)
                    if progress:
                        progress(len(chunk))
                await asyncio.to_thread(out.close)
                await asyncio.to_thread(os.replace, part, target)
            except BaseException:
                out.close()
                part.unlink(missing_ok=True)
                raise
            return d.entry

    # ---- writing -------------------------------------------------------------------------
    async def supports_tus(self) -> bool:
        if self._tus is None:
            try:
                resp = await self._request("OPTIONS", f"{self.url}/v1/uploads", ok=(200, 204))
                self._tus = resp.headers.get("Tus-Resumable") == TUS_VERSION
            except ClientError:
                self._tus = False
        return self._tus

    async def upload(
        self,
        path: str,
        source: AsyncSource,
        *,
        resumable: bool | None = None,
        chunk_size: int = TUS_CHUNK,
        progress: Progress | None = None,
        upload_url: str | None = None,
        on_upload_url: Callable[[str | None], None] | None = None,
    ) -> UploadResult:
        """Create or replace ``path``: bytes, a local file path, or an (async) iterable of
        chunks. ``resumable`` as in ``Client.upload`` (tus for files/bytes of 16 MiB or more
        when the server offers it)."""
        size: int | None = None
        local: Path | None = None
        data: bytes | bytearray | memoryview | None = None
        if isinstance(source, str | os.PathLike):
            local = Path(source)
            size = (await asyncio.to_thread(local.stat)).st_size
        elif isinstance(source, bytes | bytearray | memoryview):
            data = source
            size = len(source)
        seekable = size is not None
        use_tus = resumable
        if use_tus is None:
            use_tus = seekable and (size or 0) >= RESUMABLE_THRESHOLD and await self.supports_tus()
        elif use_tus and not await self.supports_tus():
            raise ClientError(0, "TUS_UNSUPPORTED", "the server has no /v1/uploads (tus)")

        def chunks(offset: int, n: int, report: Progress | None = progress) -> AsyncIterator[bytes]:
            if local is not None:
                return _file_chunks(local, offset, n, report)
            assert data is not None
            return _bytes_chunks(data, offset, n, report)

        if not use_tus:
            headers = {"Content-Type": "application/octet-stream"}
            if size is not None:
                headers["Content-Length"] = str(size)
                body: AsyncIterator[bytes] = chunks(0, size)
            else:
                body = _iter_chunks(source, progress)  # type: ignore[arg-type]
            await self._request(
                "PUT", files_url(self.url, path), ok=(200, 201), data=body, headers=headers
            )
            return UploadResult(normalize(path), -1 if size is None else size, False)
        if size is None:
            raise ClientError(0, "BAD_SOURCE", "a resumable upload needs bytes or a file path")
        offset = 0
        if upload_url is not None:
            try:
                offset, length = await self.tus_status(upload_url)
                if length != size:  # another upload's URL: start a new one
                    upload_url = None
            except ClientError as exc:
                if exc.status not in (403, 404, 410):
                    raise
                upload_url = None
        if upload_url is None:
            upload_url = await self.tus_create(path, size)
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
                    shown, offset = offset + sent, await self.tus_offset(upload_url)
                    stale, sent = False, 0
                    if progress and offset != shown:
                        progress(offset - shown)
                    continue
                n = min(chunk_size, size - offset)
                headers = {
                    "Tus-Resumable": TUS_VERSION,
                    "Upload-Offset": str(offset),
                    "Content-Type": OFFSET_CONTENT_TYPE,
                    "Content-Length": str(n),
                }
                sent = 0
                resp = await self._request(
                    "PATCH", upload_url, ok=(204,), data=chunks(offset, n, counted), headers=headers
                )
                offset = int(resp.headers.get("Upload-Offset") or offset + n)
                sent = failures = 0
            except ClientError as exc:
                retry = isinstance(exc, TransportError) or exc.status in (409, 500, 502, 503)
                failures += 1
                if not retry or failures > TUS_RETRIES:
                    raise
                await asyncio.sleep(min(0.5 * 2**failures, 10.0))
                stale = True
        if on_upload_url:
            on_upload_url(None)
        return UploadResult(normalize(path), size, True, resumed_from, upload_url)

    async def tus_create(self, path: str, length: int) -> str:
        resp = await self._request(
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

    async def tus_offset(self, upload_url: str) -> int:
        return (await self.tus_status(upload_url))[0]

    async def tus_status(self, upload_url: str) -> tuple[int, int]:
        """``HEAD``: (bytes acknowledged, declared length)."""
        resp = await self._request("HEAD", upload_url, headers={"Tus-Resumable": TUS_VERSION})
        return int(resp.headers.get("Upload-Offset") or 0), int(
            resp.headers.get("Upload-Length") or -1
        )

    async def tus_terminate(self, upload_url: str) -> None:
        await self._request("DELETE", upload_url, ok=(204,), headers={"Tus-Resumable": TUS_VERSION})

    # ---- namespace -----------------------------------------------------------------------
    async def mkdir(self, path: str) -> bool:
        resp = await self._request("POST", files_url(self.url, path, directory=True), ok=(200, 201))
        return resp.status == 201

    async def move(
        self, src: str, dst: str, *, overwrite: bool = False, create_parents: bool = False
    ) -> str:
        body = {
            "destination": normalize(dst),
            "overwrite": overwrite,
            "create_parents": create_parents,
        }
        doc = await self._json("PATCH", files_url(self.url, src), json=body)
        return str(doc["path"])

    async def rename(self, path: str, name: str) -> str:
        doc = await self._json("PATCH", files_url(self.url, path), json={"name": name})
        return str(doc["path"])

    async def delete(self, path: str, *, recursive: bool = False) -> None:
        url = files_url(self.url, path) + ("?recursive=true" if recursive else "")
        await self._request("DELETE", url, ok=(204,))

    async def share(self, path: str, expiry_seconds: int = 3600) -> Link:
        body = {"path": normalize(path), "expiry_seconds": expiry_seconds}
        for attempt in range(LINK_RETRIES + 1):
            try:
                doc = await self._json(
                    "POST", f"{self.url}/v1/links/generate", ok=(200, 201), json=body
                )
                break
            except ClientError as exc:  # 429: the server's per-IP link rate limit
                if exc.status != 429 or attempt == LINK_RETRIES:
                    raise
                await asyncio.sleep(0.05 * 2**attempt)
        return Link(url=str(doc["url"]), token=str(doc["token"]), expires=str(doc["expires"]))
