"""One error tree for everything CallFS raises on purpose.

    CallFSError
    ├── BadRequest            400 BAD_REQUEST
    │   └── ParentMissing         (a move's destination parent does not exist)
    ├── AuthenticationFailed  401 AUTHENTICATION_FAILED
    ├── PermissionDenied      403 PERMISSION_DENIED
    ├── NotFound              404 FILE_NOT_FOUND
    ├── LinkNotFound          404 LINK_NOT_FOUND
    ├── UploadNotFound        404 UPLOAD_NOT_FOUND (a resumable upload, ``/v1/uploads/``)
    ├── AlreadyExists         409 FILE_ALREADY_EXISTS
    │   ├── ParentNotDirectory    (a parent path is a file)
    │   └── UploadCommitInDoubt   (tus: a commit tried again after the destination changed)
    ├── DirectoryNotEmpty     409 DIRECTORY_NOT_EMPTY
    ├── LinkExpired           410 LINK_EXPIRED
    ├── LinkAlreadyUsed       410 LINK_ALREADY_USED
    ├── UploadExpired         410 UPLOAD_EXPIRED
    ├── UploadOffsetMismatch  409 UPLOAD_OFFSET_MISMATCH (tus: ``Upload-Offset`` is not the offset)
    ├── ChecksumMismatch      460 CHECKSUM_MISMATCH (tus checksum extension)
    ├── TusVersionMismatch    412 PRECONDITION_FAILED (tus: ``Tus-Resumable`` is not 1.0.0)
    ├── UnsupportedMediaType  415 UNSUPPORTED_MEDIA_TYPE (tus: a PATCH body of another type)
    ├── PayloadTooLarge       413 PAYLOAD_TOO_LARGE
    ├── RangeNotSatisfiable   416 RANGE_NOT_SATISFIABLE
    ├── RateLimited           429 RATE_LIMIT_EXCEEDED
    ├── InternalError         500 INTERNAL_ERROR
    ├── PeerUnavailable       502 PEER_UNAVAILABLE
    ├── Unavailable           503 UNAVAILABLE (store down, lock wait timed out, no leader)
    │   └── LockTimeout
    ├── InsufficientShards    503 INSUFFICIENT_SHARDS
    ├── InsufficientStorage   507 INSUFFICIENT_STORAGE (a backend has no space or quota left)
    ├── RemoteOwner           the item's bytes live on another node: proxy there (or 409 on create)
    ├── VersionConflict       a conditional metadata write lost a race (internal; retried or mapped)
    ├── UnsafePath            a backend path resolves outside its root (500)
    └── ConfigError           configuration could not be loaded or validated (never reaches HTTP)

The message of every error is safe to show to a client: it never contains server paths, secrets or
exception text. ``api/errors.py`` holds the single table from class to HTTP status and code.
"""

from __future__ import annotations


class CallFSError(Exception):
    """Base of every error CallFS raises on purpose."""

    default_message = "an internal error occurred"

    def __init__(self, message: str | None = None) -> None:
        self.message = message if message is not None else self.default_message
        super().__init__(self.message)


class BadRequest(CallFSError):
    default_message = "bad request"


class ParentMissing(BadRequest):
    default_message = "destination parent does not exist"


class AuthenticationFailed(CallFSError):
    default_message = "authentication failed"


class PermissionDenied(CallFSError):
    default_message = "permission denied"


class NotFound(CallFSError):
    default_message = "file not found"


class BlobDamaged(NotFound):
    """The file's bytes are shorter than its record (truncated on disk, a damaged object): a 404
    to clients (§9.3: missing bytes), a failure, not "deleted meanwhile", to a drain."""

    default_message = "the file's bytes are missing or incomplete"


class LinkNotFound(CallFSError):
    default_message = "link not found"


class AlreadyExists(CallFSError):
    default_message = "file already exists"


class ParentNotDirectory(AlreadyExists):
    default_message = "a parent path is a file"


class UploadCommitInDoubt(AlreadyExists):
    """A finished upload's earlier commit may or may not have happened (a crash, a lost
    answer), and the destination has changed since: publishing now could apply it twice, over
    a later write; calling it done could acknowledge bytes that never landed."""

    default_message = (
        "the destination changed while this upload's commit was in doubt; upload it again"
    )


class DirectoryNotEmpty(CallFSError):
    default_message = "directory not empty"


class LinkExpired(CallFSError):
    default_message = "link expired"


class LinkAlreadyUsed(CallFSError):
    default_message = "link already used"


class UploadNotFound(CallFSError):
    default_message = "upload not found"


class UploadExpired(CallFSError):
    default_message = "upload expired"


class UploadOffsetMismatch(CallFSError):
    default_message = "Upload-Offset does not match the upload's offset"


class ChecksumMismatch(CallFSError):
    default_message = "checksum mismatch"


class TusVersionMismatch(CallFSError):
    default_message = "Tus-Resumable must be 1.0.0"


class UnsupportedMediaType(CallFSError):
    default_message = "Content-Type must be application/offset+octet-stream"


class PayloadTooLarge(CallFSError):
    default_message = "payload too large"


class RangeNotSatisfiable(CallFSError):
    default_message = "range not satisfiable"

    def __init__(self, size: int, message: str | None = None) -> None:
        self.size = size
        super().__init__(message)


class RateLimited(CallFSError):
    default_message = "Rate limit exceeded"


class InternalError(CallFSError):
    default_message = "an internal error occurred"


class PeerUnavailable(CallFSError):
    default_message = "peer unavailable"


class Unavailable(CallFSError):
    default_message = "service unavailable"

    def __init__(self, message: str | None = None, retry_after: int = 1) -> None:
        self.retry_after = retry_after
        super().__init__(message)


class LockTimeout(Unavailable):
    default_message = "timed out waiting for a lock"


class InsufficientShards(CallFSError):
    default_message = "not enough intact shards to rebuild the file"


class InsufficientStorage(CallFSError):
    """A backend ran out of space (ENOSPC) or quota (EDQUOT) while storing bytes; nothing of the
    write became visible."""

    default_message = "insufficient storage"


class RemoteOwner(CallFSError):
    """The item is owned by another node (``instance_id``); the API layer proxies the request there,
    or answers a create with the cross-server 409 (§9.5)."""

    default_message = "resource exists on another server"

    def __init__(self, path: str, instance_id: str, is_dir: bool, backend_type: str) -> None:
        self.path = path
        self.instance_id = instance_id
        self.is_dir = is_dir
        self.backend_type = backend_type
        super().__init__()


class VersionConflict(CallFSError):
    default_message = "the item changed concurrently"


class VersionMoved(CallFSError):
    """412 between nodes: the owner's current version of a file is not the one the asking node
    named (replaced since it looked the file up); the asking node looks it up again."""

    default_message = "the file was replaced"


class KeptChanging(Unavailable):
    """503: every re-decision of a write lost its race until the lock timeout (nothing of this
    request applied: each refusal was definite), or a read met a newer version at each open."""

    default_message = "the item kept changing; try again"


class UnsafePath(CallFSError):
    default_message = "an internal error occurred"


class ConfigError(CallFSError):
    default_message = "invalid configuration"
