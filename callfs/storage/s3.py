"""S3 and S3-compatible storage (``backend.s3_*``, API.md §7): the only boto3 importer.

Layout: the blob ``k`` is the object ``.callfs/blobs/k`` (``docs/storage-layout.md``); a legacy key
(a file written before blob keys) is its namespace path without the leading ``/``. There are no
directory objects: directories exist only in metadata. One client is made at start (path-style
addressing for a custom endpoint) and every call runs off the event loop.

Writes of unknown length: up to one part is buffered (bounded memory); a body that fits in one part
is written by ``put_object`` at publish; a larger one is a multipart upload to the blob's key whose
parts are uploaded as they fill and which is completed only at publish. Any failure aborts the
multipart upload: no orphan parts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

from callfs.concurrency import run_blocking, run_to_end
from callfs.errors import (
    BadRequest,
    CallFSError,
    ConfigError,
    InternalError,
    NotFound,
    Unavailable,
    UnsafePath,
)
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

#: Reads from S3 start at FIRST_READ bytes (a quick first byte) and grow fourfold per read up
#: to READ_CHUNK: each read is one thread hop, and 4 MiB reads cost half the CPU of 1 MiB
#: reads and measured 0.78-0.86x of boto3 direct on a 256 MiB GET, against 0.66-0.70x.
FIRST_READ = 256 * 1024
READ_CHUNK = 4 * 1024 * 1024
PARTS_IN_FLIGHT = 2
#: Multipart uploads carry a CRC32 per part (what boto3's own upload_file sends): the store checks
#: each part as it arrives and the object's checksum is composed from the parts' at completion,
#: where an upload without one makes S3-compatible stores (moto, for one) checksum the whole
#: object again at CompleteMultipartUpload.
CHECKSUM = "CRC32"
_NOT_FOUND = {"404", "NoSuchKey", "NotFound", "NoSuchUpload"}


BLOB_PREFIX = ".callfs/blobs/"
REPLICA_OBJECTS = ".callfs/replica/"


INTERNAL_PREFIX = ".callfs/"


def _area_key(area: str, object_key: str) -> str | None:
    """The ``list_keys`` key of an object of ``area`` (None: not something the server made)."""
    if area == AREA_SHARDS:
        upload, _, index = object_key.removeprefix(SHARD_PREFIX).partition("/")
        ok = is_blob_key(upload) and index.isascii() and index.isdigit()
        return object_key if ok else None
    name = object_key.rpartition("/")[2]
    if not is_blob_key(name):
        return None
    return REPLICA_PREFIX + name if area == AREA_REPLICAS else name


def key_of(key: str) -> str:
    """The object key of a blob key (legacy keys are namespace paths, kept where they were)."""
    if is_blob_key(key):
        return BLOB_PREFIX + key
    if is_replica_key(key):
        return REPLICA_OBJECTS + key[len(REPLICA_PREFIX) :]
    legacy = key.lstrip("/")
    if not legacy or legacy.startswith(".callfs/"):
        raise UnsafePath()
    return legacy


def translate(exc: Exception) -> CallFSError:
    """botocore errors -> the CallFS error tree (never leaking the exception text to clients)."""
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in _NOT_FOUND:
            return NotFound()
        if code in ("SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "503"):
            return Unavailable("S3 is unavailable")
        # the operation and S3's own words name the failure for the operator (they carry keys
        # and upload ids, never credentials); the client gets no detail
        message = str(exc.response.get("Error", {}).get("Message", ""))[:200]
        log.error("S3 %s failed: %s %s", exc.operation_name, code, message)
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
        size = FIRST_READ
        while remaining > 0:
            try:
                # to its end even if the consumer is cancelled: ``aclose`` then never closes
                # the body while a thread still reads from it
                chunk: bytes = await run_to_end(self._body.read, min(size, remaining))
            except (BotoCoreError, ClientError, OSError) as exc:
                raise translate(exc) from exc
            if not chunk:
                return
            remaining -= len(chunk)
            size = min(size * 4, READ_CHUNK)
            yield chunk

    async def aclose(self) -> None:
        if self._body is not None:
            await run_blocking(self._body.close)
            self._body = None


class _Staged:
    def __init__(
        self,
        backend: S3Backend,
        key: str,
        object_key: str,
        size: int,
        small: bytes | None,
        upload: dict[str, Any],
    ) -> None:
        self._backend = backend
        self.key = key
        self._key = object_key
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
        self._backend.writing.discard(self._upload["id"])
        self._upload = {}

    async def discard(self) -> None:
        self._small = None
        if self._upload:
            await self._backend._abort(self._key, self._upload["id"])
            self._upload = {}


#: How much later than its LastModified a multipart object is taken as written. S3 gives such an
#: object the time its upload BEGAN, so one that took longer than the orphan sweep's grace (an
#: hour) looked old the moment it was completed, and a sweep between that completion and the
#: metadata commit removed the blob the commit then named (found by a crash-safety review).
MULTIPART_AGE_SLACK = 24 * 3600.0


def _written_at(obj: dict[str, Any]) -> float:
    """When a listed object was written, as far as the listing can tell: LastModified, plus
    ``MULTIPART_AGE_SLACK`` for a multipart object (its ETag ends in ``-<parts>``)."""
    at: float = obj["LastModified"].timestamp()
    if "-" in str(obj.get("ETag", "")):
        at += MULTIPART_AGE_SLACK
    return at


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
        #: Multipart uploads this process is still writing (staged, not yet published or
        #: discarded): the sweep of stale uploads never aborts them. S3 says when an upload was
        #: initiated, but not every S3-compatible server says it right (moto dates every upload
        #: 2010-11-10): a sweep there aborted a 2 GiB upload in the middle.
        self.writing: set[str] = set()

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
        self.writing.discard(upload_id)
        try:
            await run_blocking(
                self.client.abort_multipart_upload, Bucket=self.bucket, Key=key, UploadId=upload_id
            )
        except (ClientError, BotoCoreError, OSError) as exc:
            log.warning(
                "could not abort a multipart upload (%s); a lifecycle rule should clean it",
                exc.response.get("Error", {}).get("Code", "")
                if isinstance(exc, ClientError)
                else type(exc).__name__,
            )

    # ---- writes ----------------------------------------------------------------------------
    async def stage_file(self, blob: str, source: str) -> _Staged:
        """A local file's bytes, streamed up like any body (no server-side shortcut)."""
        return await self.stage(blob, LocalFile(source))

    async def stage(self, blob: str, chunks: AsyncIterable[Chunk]) -> _Staged:
        key = key_of(blob)
        # The body is kept as the pieces it arrived in (bytes: immutable, so held without a
        # copy; other buffers are copied, their producer may reuse them) and joined once per
        # part: one copy per byte instead of three.
        pieces: list[bytes | memoryview] = []
        held = 0
        size = 0
        upload: dict[str, Any] = {}
        in_flight: set[asyncio.Task[None]] = set()
        try:
            async for chunk in chunks:
                size += len(chunk)
                view = memoryview(chunk if isinstance(chunk, bytes) else bytes(chunk))
                while len(view) >= self.part_size - held:
                    take = self.part_size - held
                    pieces.append(view[:take])
                    view = view[take:]
                    part = b"".join(pieces)
                    pieces, held = [], 0
                    if not upload:
                        created = await self._call(
                            self.client.create_multipart_upload,
                            Bucket=self.bucket,
                            Key=key,
                            ChecksumAlgorithm=CHECKSUM,
                            **self._extra,
                        )
                        upload = {"id": created["UploadId"], "parts": [], "next": 1}
                        self.writing.add(upload["id"])
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
                if view:
                    pieces.append(view)
                    held += len(view)
            buf = b"".join(pieces)
            pieces = []
            if upload:
                if buf:
                    last = self._upload_part(key, upload, upload["next"], bytes(buf))
                    in_flight.add(asyncio.create_task(last))
                for outcome in await asyncio.gather(*in_flight, return_exceptions=True):
                    if isinstance(outcome, BaseException):
                        raise outcome
                in_flight = set()
                upload["parts"].sort(key=lambda p: p["PartNumber"])
                return _Staged(self, blob, key, size, None, upload)
            return _Staged(self, blob, key, size, buf, {})
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
            ChecksumAlgorithm=CHECKSUM,
        )
        part = {"ETag": done["ETag"], "PartNumber": number}
        if done.get("ChecksumCRC32"):
            part["ChecksumCRC32"] = done["ChecksumCRC32"]
        upload["parts"].append(part)

    # ---- reads -----------------------------------------------------------------------------
    async def open_read(self, blob: str, offset: int = 0, length: int | None = None) -> S3Stream:
        key = key_of(blob)
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

    async def stat(self, blob: str) -> ObjectStat | None:
        try:
            head = await self._head(key_of(blob))
        except NotFound:
            return None
        return ObjectStat(int(head["ContentLength"]), False, head["LastModified"].timestamp())

    # ---- removal ---------------------------------------------------------------------------
    async def delete(self, blob: str) -> None:
        key = key_of(blob)
        await self._head(key)  # NotFound when missing
        await self._call(self.client.delete_object, Bucket=self.bucket, Key=key)

    async def list_blobs(self, older_than: float, limit: int = 10_000) -> list[str]:
        cutoff = time.time() - older_than
        found: list[str] = []
        token: str | None = None
        while len(found) < limit:
            args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": BLOB_PREFIX}
            if token:
                args["ContinuationToken"] = token
            page = await self._call(self.client.list_objects_v2, **args)
            for obj in page.get("Contents", []):
                name = obj["Key"][len(BLOB_PREFIX) :]
                if is_blob_key(name) and obj["LastModified"].timestamp() <= cutoff:
                    found.append(name)
            if not page.get("IsTruncated"):
                break
            token = page["NextContinuationToken"]
        return found[:limit]

    async def sweep_temp(self, older_than: float) -> int:
        """Abort multipart uploads of blobs, replica copies and shards started more than
        ``older_than`` seconds ago (a crash mid-upload leaves one; parts are invisible but
        billed)."""
        cutoff = time.time() - older_than
        aborted = 0
        for upload in await self._uploads():
            key, upload_id = upload["Key"], upload["UploadId"]
            if upload_id in self.writing:
                continue  # ours, still being written, whatever S3 says of its age
            if upload["Initiated"].timestamp() > cutoff:
                continue
            # Another process's (a worker of this node, or another node on the bucket) may be
            # under way for longer than the grace: what counts is when it last received a part.
            try:
                last = await self._last_part_time(key, upload_id)
            except NotFound:
                continue  # completed or aborted meanwhile
            except CallFSError as exc:
                # Not knowing (no s3:ListMultipartUploadParts permission, throttling) must not
                # cut an upload that may be in progress: left for the next pass, or a lifecycle
                # rule of the bucket.
                log.warning(
                    "left a multipart upload alone: its parts could not be listed (%s)", exc
                )
                continue
            if last is not None and last > cutoff:
                continue
            await self._abort(key, upload_id)
            aborted += 1
        return aborted

    async def _last_part_time(self, key: str, upload_id: str) -> float | None:
        """When the upload's newest part arrived (None: no part yet). ``NotFound``: the upload
        is gone."""
        latest: float | None = None
        marker: dict[str, int] = {}
        while True:
            page = await self._call(
                self.client.list_parts, Bucket=self.bucket, Key=key, UploadId=upload_id, **marker
            )
            for part in page.get("Parts", []):
                stamp = part["LastModified"].timestamp()
                latest = stamp if latest is None else max(latest, stamp)
            following = int(page.get("NextPartNumberMarker") or 0)
            if not page.get("IsTruncated") or following <= marker.get("PartNumberMarker", 0):
                return latest  # the last page (or a store whose marker does not move on)
            marker = {"PartNumberMarker": following}

    async def _uploads(self) -> list[dict[str, Any]]:
        """Unfinished multipart uploads under the server's prefixes (first page of each)."""
        found: list[dict[str, Any]] = []
        for prefix in (INTERNAL_PREFIX, SHARD_PREFIX):
            page = await self._call(
                self.client.list_multipart_uploads, Bucket=self.bucket, Prefix=prefix
            )
            found.extend(page.get("Uploads", []))
        return found

    async def list_keys(self, area: str, after: str = "", limit: int = 1000) -> list[StoredObject]:
        if area == AREA_TEMP:
            uploads = sorted(
                (f"{u['Key']}#{u['UploadId']}", u["Initiated"].timestamp())
                for u in await self._uploads()
            )
            return [StoredObject(k, 0, t) for k, t in uploads if k > after][: max(limit, 1)]
        prefixes = {AREA_BLOBS: BLOB_PREFIX, AREA_REPLICAS: REPLICA_OBJECTS, AREA_SHARDS: ""}
        if area not in prefixes:
            raise BadRequest(f"unknown storage area {area!r}")
        prefix = prefixes[area] or SHARD_PREFIX
        start = key_of(after) if after and area != AREA_SHARDS else after
        found: list[StoredObject] = []
        token: str | None = None
        while len(found) < limit:
            args: dict[str, Any] = {
                "Bucket": self.bucket,
                "Prefix": prefix,
                "MaxKeys": min(max(limit - len(found), 1), 1000),
            }
            if token:
                args["ContinuationToken"] = token
            elif start:
                args["StartAfter"] = start
            page = await self._call(self.client.list_objects_v2, **args)
            for obj in page.get("Contents", []):
                key = _area_key(area, obj["Key"])
                if key is not None:
                    found.append(StoredObject(key, int(obj["Size"]), _written_at(obj)))
            if not page.get("IsTruncated"):
                break
            token = page["NextContinuationToken"]
        return found[:limit]
