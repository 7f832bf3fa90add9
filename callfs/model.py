"""Plain records shared by every layer. Frozen, slotted, no behaviour beyond small derivations."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class EntryType(enum.StrEnum):
    FILE = "file"
    DIRECTORY = "directory"


class BackendType(enum.StrEnum):
    LOCALFS = "localfs"
    S3 = "s3"
    ERASURE = "erasure"


FILE_MODE = "0644"
DIR_MODE = "0755"
ROOT_OWNER = "root"
INTERNAL_PROXY_USER = "internal-proxy"
ADMIN_USERS = frozenset({ROOT_OWNER, INTERNAL_PROXY_USER})


def parent_of(path: str) -> str:
    """Parent engine path of a canonical engine path (``/`` for top-level items and for ``/``)."""
    if path == "/":
        return "/"
    head = path.rsplit("/", 1)[0]
    return head or "/"


def name_of(path: str) -> str:
    """Last element of a canonical engine path (empty for ``/``)."""
    return path.rsplit("/", 1)[1] if path != "/" else ""


@dataclass(frozen=True, slots=True)
class Entry:
    """One item of the namespace, keyed by its canonical engine path.

    ``version`` starts at 1 and is bumped by every committed change; conditional writes compare it.
    Times are whole seconds since the epoch (UTC).
    """

    path: str
    type: EntryType
    size: int
    owner: str
    mtime: int
    backend_type: BackendType
    instance_id: str | None
    version: int = 1
    created_at: int = 0
    erasure_coded: bool = False
    #: The placement record's blob key: where this version's bytes live in ``backend_type`` on
    #: ``instance_id``. Immutable bytes: a new version always names a new key. None for
    #: directories (they have no bytes).
    blob_key: str | None = None

    @property
    def name(self) -> str:
        return name_of(self.path)

    @property
    def parent(self) -> str:
        return parent_of(self.path)

    @property
    def is_dir(self) -> bool:
        return self.type is EntryType.DIRECTORY

    @property
    def mode(self) -> str:
        return DIR_MODE if self.is_dir else FILE_MODE


@dataclass(frozen=True, slots=True)
class NewParents:
    """How a create or move makes missing ancestors: directories with these fields."""

    owner: str
    mtime: int
    backend_type: BackendType
    instance_id: str | None


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a file's bytes live: the part of an entry a backend move switches. For a directory
    (no bytes: ``blob_key`` None) only ``backend_type`` and ``instance_id``, its owner node,
    switch (a drain re-tags the directories of the node it empties)."""

    backend_type: BackendType
    instance_id: str | None
    blob_key: str | None
    size: int


class LinkStatus(enum.StrEnum):
    ACTIVE = "active"
    USED = "used"
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class Link:
    """A single-use download link. Times are float seconds since the epoch."""

    token: str
    path: str
    status: LinkStatus
    expires_at: float
    created_at: float
    signature: str
    used_at: float | None = None
    used_by_ip: str | None = None


@dataclass(frozen=True, slots=True)
class ShardInfo:
    index: int
    instance_id: str
    backend_type: str
    path: str
    size: int
    checksum: str


@dataclass(frozen=True, slots=True)
class ErasureLayout:
    file_path: str
    original_size: int
    data_shards: int
    parity_shards: int
    shard_size: int
    upload_id: str
    shards: tuple[ShardInfo, ...] = field(default_factory=tuple)
    #: Bytes per shard per stripe (the codec's block; 0 in layouts written before it was kept).
    block_size: int = 0
    #: Tag after every block in the shards (``erasure/codec.py`` FRAMES; "sha256" in layouts
    #: written before the tag was kept).
    frame: str = "sha256"
    #: The last stripe's blocks are cut to its bytes (``erasure/codec.py``); False in layouts
    #: written before, whose last stripe is zero-padded to whole blocks.
    tail: bool = False


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is calling: a user ID from an API key, or an admin identity."""

    user_id: str

    @property
    def is_admin(self) -> bool:
        return self.user_id in ADMIN_USERS


@dataclass(frozen=True, slots=True)
class WorkItem:
    """A unit of background work (the WorkQueue, ``jobs/base.py``)."""

    id: int
    kind: str
    key: str
    arg: str
    attempts: int
