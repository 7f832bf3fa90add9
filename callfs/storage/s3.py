"""S3 and S3-compatible storage (``backend.s3_*``, API.md §7): the only boto3 importer.

Layout: an engine path ``/a/b`` is the key ``a/b``; a directory is an empty ``a/b/`` marker
object. One client is made at start (path-style addressing for a custom endpoint) and every call
runs off the event loop. Writes of unknown length: up to one part is buffered (bounded memory); a
body that fits in one part is written by ``put_object`` at publish; a larger one is a multipart
upload to the final key whose parts are uploaded as they fill and which is completed only at
publish, so readers see the whole old or the whole new object. Any failure aborts the multipart
upload: no orphan parts.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

from callfs.concurrency import run_blocking
from callfs.errors import (
    CallFSError,
    ConfigError,
    DirectoryNotEmpty,
    InternalError,
    NotFound,
    Unavailable,
)
from callfs.storage.base import ObjectStat

log = logging.getLogger(__name__)

READ_CHUNK = 1024 * 1024
PARTS_IN_FLIGHT = 2
_NOT_FOUND = {"404", "NoSuchKey", "NotFound", "NoSuchUpload"}


def key_of(path: str) -> str:
    return path.lstrip("/")


def translate(exc: Exception) -> CallFSError:
    """botocore errors -> the CallFS error tree (never leaking the exception text to clients)."""
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in _NOT_FOUND:
            return NotFound()
        if code in ("SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "503"):
            return Unavailable("S3 is unavailable")
        log.error("S3 request failed: %s", code)
        return InternalError()
    log.error("S3 unreachable: %s", type(exc).__name__)
    return Unavailable("S3 is unreachable")


class S3Stream:
    def __init__(self, body: Any, length: int) -> None:
        self._body = body
        self.length = length

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self._body is None:
            return
        remaining = self.length
        while remaining > 0:
            try:
                chunk: bytes = await run_blocking(self._body.read, min(READ_CHUNK, remaining))
            except (BotoCoreError, ClientError, OSError) as exc:
                raise translate(exc) from exc
            if not chunk:
                return
            remaining -= len(chunk)
            yield chunk

    async def aclose(self) -> None:
        if self._body is not None:
            await run_blocking(self._body.close)
            self._body = None


class _Staged:
    def __init__(
        self, backend: S3Backend, key: str, size: int, small: bytes | None, upload: dict[str, Any]
    ) -> None:
        self._backend = backend
        self._key = key
        self.size = size
        self._small = small
        self._upload = upload

    async def publish(self) -> None:
        if self._small is not None:
            await self._backend._call(self._backend._put_object, self._key, self._small)
            self._small = None
            return
        await self._backend._call(
            self._backend.client.complete_multipart_upload,
            Bucket=self._backend.bucket,
            Key=self._key,
            UploadId=self._upload["id"],
            MultipartUpload={"Parts": self._upload["parts"]},
        )
        self._upload = {}

    async def discard(self) -> None:
        self._small = None
        if self._upload:
            await self._backend._abort(self._key, self._upload["id"])
            self._upload = {}


class S3Backend:
    kind = "s3"

    def __init__(
        self,
        *,
        bucket: str,
        region: str = "us-east-1",
        endpoint: str = "",
        access_key: str = "",
        secret_key: str = "",
        sse: str = "AES256",
        kms_key_id: str = "",
        acl: str = "private",
        part_size: int = 8 * 1024 * 1024,
    ) -> None:
        self.bucket = bucket
        self._region = region
        self._endpoint = endpoint
        self._access_key = access_key
        self._secret_key = secret_key
        self.part_size = max(part_size, 5 * 1024 * 1024)
        extra: dict[str, str] = {}
        if sse:
            extra["ServerSideEncryption"] = sse
            if sse == "aws:kms" and kms_key_id:
                extra["SSEKMSKeyId"] = kms_key_id
        if acl:
            extra["ACL"] = acl
        self._extra = extra
        self._client: Any = None

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        await run_blocking(self._start_blocking)

    def _start_blocking(self) -> None:
        kwargs: dict[str, Any] = {
            "region_name": self._region,
            "config": BotoConfig(
                s3={"addressing_style": "path"} if self._endpoint else {},
                retries={"max_attempts": 3, "mode": "standard"},
                connect_timeout=5,
                read_timeout=60,
                max_pool_connections=64,
            ),
        }
        if self._endpoint:
            kwargs["endpoint_url"] = self._endpoint
        if self._access_key:
            kwargs["aws_access_key_id"] = self._access_key
            kwargs["aws_secret_access_key"] = self._secret_key
        self._client = boto3.client("s3", **kwargs)
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError) as exc:
            reason = (
                exc.response.get("Error", {}).get("Code", "error")
                if isinstance(exc, ClientError)
                else type(exc).__name__
            )
            raise ConfigError(
                f'backend.s3_bucket_name: bucket "{self.bucket}" is not reachable ({reason})'
            ) from exc

    async def close(self) -> None:
        if self._client is not None:
            await run_blocking(self._client.close)
            self._client = None

    @property
    def client(self) -> Any:
        if self._client is None:
            raise Unavailable("S3 backend is not running")
        return self._client

    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await run_blocking(fn, *args, **kwargs)
        except (ClientError, BotoCoreError, EndpointConnectionError, OSError) as exc:
            raise translate(exc) from exc

    def _put_object(self, key: str, body: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=body, **self._extra)

    async def _abort(self, key: str, upload_id: str) -> None:
        try:
            await run_blocking(
                self.client.abort_multipart_upload, Bucket=self.bucket, Key=key, UploadId=upload_id
            )
        except (ClientError, BotoCoreError, OSError):
            log.warning("could not abort a multipart upload; a lifecycle rule should clean it")

    # ---- writes ----------------------------------------------------------------------------
    async def stage(self, path: str, chunks: AsyncIterable[bytes]) -> _Staged:
        key = key_of(path)
        buf = bytearray()
        size = 0
        upload: dict[str, Any] = {}
        in_flight: set[asyncio.Task[None]] = set()
        try:
            async for chunk in chunks:
                buf += chunk
                size += len(chunk)
                while len(buf) >= self.part_size:
                    if not upload:
                        created = await self._call(
                            self.client.create_multipart_upload,
                            Bucket=self.bucket,
                            Key=key,
                            **self._extra,
                        )
                        upload = {"id": created["UploadId"], "parts": [], "next": 1}
                    part = bytes(buf[: self.part_size])
                    del buf[: self.part_size]
                    # Up to PARTS_IN_FLIGHT parts go up at once: memory stays bounded by
                    # (PARTS_IN_FLIGHT + 1) x part_size while the link is kept busy.
                    if len(in_flight) >= PARTS_IN_FLIGHT:
                        finished, in_flight = await asyncio.wait(
                            in_flight, return_when=asyncio.FIRST_COMPLETED
                        )
                        for task in finished:
                            task.result()
                    number = upload["next"]
                    upload["next"] += 1
                    in_flight.add(asyncio.create_task(self._upload_part(key, upload, number, part)))
            if upload:
                if buf:
                    last = self._upload_part(key, upload, upload["next"], bytes(buf))
                    in_flight.add(asyncio.create_task(last))
                for outcome in await asyncio.gather(*in_flight, return_exceptions=True):
                    if isinstance(outcome, BaseException):
                        raise outcome
                in_flight = set()
                upload["parts"].sort(key=lambda p: p["PartNumber"])
                return _Staged(self, key, size, None, upload)
            return _Staged(self, key, size, bytes(buf), {})
        except BaseException:
            for task in in_flight:
                task.cancel()
            await asyncio.gather(*in_flight, return_exceptions=True)
            if upload:
                await self._abort(key, upload["id"])
            raise

    async def _upload_part(
        self, key: str, upload: dict[str, Any], number: int, data: bytes
    ) -> None:
        done = await self._call(
            self.client.upload_part,
            Bucket=self.bucket,
            Key=key,
            UploadId=upload["id"],
            PartNumber=number,
            Body=data,
        )
        upload["parts"].append({"ETag": done["ETag"], "PartNumber": number})

    # ---- reads -----------------------------------------------------------------------------
    async def open_read(self, path: str, offset: int = 0, length: int | None = None) -> S3Stream:
        key = key_of(path)
        if length == 0:
            await self._head(key)
            return S3Stream(None, 0)
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if offset or length is not None:
            last = "" if length is None else str(offset + length - 1)
            args["Range"] = f"bytes={offset}-{last}"
        try:
            got = await run_blocking(self.client.get_object, **args)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "InvalidRange":
                await self._head(key)  # exists, but the range starts at or past its end
                return S3Stream(None, 0)
            raise translate(exc) from exc
        except (BotoCoreError, OSError) as exc:
            raise translate(exc) from exc
        return S3Stream(got["Body"], int(got["ContentLength"]))

    async def _head(self, key: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._call(
            self.client.head_object, Bucket=self.bucket, Key=key
        )
        return result

    async def stat(self, path: str) -> ObjectStat | None:
        key = key_of(path)
        if key:
            try:
                head = await self._head(key)
                return ObjectStat(
                    int(head["ContentLength"]), False, head["LastModified"].timestamp()
                )
            except NotFound:
                pass
        listing = await self._call(
            self.client.list_objects_v2,
            Bucket=self.bucket,
            Prefix=key + "/" if key else "",
            MaxKeys=1,
        )
        if listing.get("KeyCount", 0) or not key:
            return ObjectStat(0, True, 0.0)
        return None

    # ---- namespace changes -----------------------------------------------------------------
    async def mkdir(self, path: str) -> None:
        parts = key_of(path).split("/")
        for i in range(1, len(parts) + 1):
            await self._call(self._put_object, "/".join(parts[:i]) + "/", b"")

    async def _keys_under(self, prefix: str) -> list[str]:
        keys: list[str] = []
        token: str | None = None
        while True:
            args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
            if token:
                args["ContinuationToken"] = token
            page = await self._call(self.client.list_objects_v2, **args)
            keys += [obj["Key"] for obj in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return keys
            token = page["NextContinuationToken"]

    async def delete(self, path: str) -> None:
        key = key_of(path)
        try:
            await self._head(key)
            await self._call(self.client.delete_object, Bucket=self.bucket, Key=key)
            return
        except NotFound:
            pass
        under = await self._keys_under(key + "/")
        if not under:
            raise NotFound()
        if any(k != key + "/" for k in under):
            raise DirectoryNotEmpty()
        await self._call(self.client.delete_object, Bucket=self.bucket, Key=key + "/")

    async def _copy(self, src: str, dst: str) -> None:
        # managed copy: a multipart copy above the single-request limit (5 GiB)
        await self._call(
            self.client.copy,
            {"Bucket": self.bucket, "Key": src},
            self.bucket,
            dst,
            ExtraArgs=dict(self._extra),
        )

    async def move(self, src: str, dst: str) -> None:
        skey, dkey = key_of(src), key_of(dst)
        try:
            await self._head(skey)
            is_file = True
        except NotFound:
            is_file = False
        if is_file:
            await self._copy(skey, dkey)
            await self._call(self.client.delete_object, Bucket=self.bucket, Key=skey)
            return
        under = await self._keys_under(skey + "/")
        if not under:
            raise NotFound()
        for k in under:
            await self._copy(k, dkey + k[len(skey) :])
        for k in under:
            await self._call(self.client.delete_object, Bucket=self.bucket, Key=k)
