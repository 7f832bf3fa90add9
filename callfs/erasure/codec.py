"""Reed-Solomon stripe codec: the only importer of zfec.

Layout (internal, API.md §11.2): stripe ``s`` of a file is bytes ``[s*k*B, (s+1)*k*B)``. It is
cut into ``k`` blocks of ``B`` bytes and encoded into ``k+m`` blocks; shard ``i`` holds block ``i``
of every stripe in order. Each block is stored framed: the block bytes then a tag over them, so a
reader verifies a block before using it. An empty file has no stripes and empty shards.

The last stripe may be short. In a *tail* layout (every layout written since the tail was kept
short, ``ErasureLayout.tail``) its blocks are ``b = ceil(r / k)`` bytes, ``r`` the bytes left for
it, so a small file costs about its own size times ``(k+m)/k`` and not ``(k+m) * B``; earlier
layouts zero-pad it to ``k*B``. A shard is ``(stripes - 1) * (B + tag) + (b + tag)`` bytes.

The tag (the layout's ``frame``) is a 128-bit XXH3 seeded with the block's place (``xxh3k``: the
upload id, the shard index and the stripe number) for layouts written since 2026-12-01; earlier
ones used plain XXH3 (``xxh3``) and, before it, the 32-byte SHA-256 (``sha256``), both still read.
A plain tag accepted a whole shard of another file, or another shard of the same file, put in its
place (a review read a swapped shard as 200 with wrong bytes): the seeded tag binds each block to
where it belongs. It guards against bit rot, torn writes and misplaced shards, not against
someone who can rewrite shard files (they could rewrite the tag too); that is what the whole-shard
SHA-256 in the layout is for (API.md §11.3). XXH3 runs at tens
of GB/s where SHA-256 runs near 1.3 GB/s on this class of machine, so the codec stays at zfec's
speed (``bench/bench_codec.py``).

zfec has no integrity check (a flipped bit decodes silently to wrong bytes): only pass blocks that
``unframe`` accepted to ``decode``.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Sequence
from typing import Protocol

import xxhash
import zfec

from callfs.concurrency import run_cpu

#: Block size of new layouts: bigger blocks mean fewer per-stripe steps (a 256 MiB erasure PUT went
#: from 0.43-0.45x to 0.52-0.55x of a plain PUT going from 256 KiB to 1 MiB); the short tail keeps
#: small files small whatever the block.
DEFAULT_BLOCK = 1024 * 1024
#: Block size of layouts that did not record theirs.
LEGACY_BLOCK = 256 * 1024
#: Frame tag of new layouts; layouts without a ``frame`` were written with ``sha256``.
DEFAULT_FRAME = "xxh3k"
#: Frames whose tag is seeded with the block's place (``Codec._seed``).
KEYED_FRAMES = frozenset({"xxh3k"})
LEGACY_FRAME = "sha256"


def _sha256(block: bytes | memoryview) -> bytes:
    return hashlib.sha256(block).digest()


Buffer = bytes | bytearray | memoryview


class _Hasher(Protocol):
    def update(self, data: Buffer, /) -> None: ...

    def digest(self) -> bytes: ...


#: Frame kind -> (tag length, tag function).
FRAMES: dict[str, tuple[int, Callable[[bytes | memoryview], bytes]]] = {
    "xxh3k": (16, xxhash.xxh3_128_digest),
    "xxh3": (16, xxhash.xxh3_128_digest),
    "sha256": (32, _sha256),
}
#: Frame kind -> incremental form of its tag function (a block that arrived in pieces).
_HASHERS: dict[str, Callable[[], _Hasher]] = {
    "xxh3k": xxhash.xxh3_128,
    "xxh3": xxhash.xxh3_128,
    "sha256": hashlib.sha256,
}


class Codec:
    """Encodes and decodes one stripe at a time with ``data_shards`` + ``parity_shards`` shards."""

    def __init__(
        self,
        data_shards: int,
        parity_shards: int,
        block_size: int = DEFAULT_BLOCK,
        frame: str = DEFAULT_FRAME,
        *,
        tail: bool = False,
        key: str = "",
    ) -> None:
        """Raise ValueError unless k >= 1, m >= 1, k + m <= 256, block_size >= 1 and ``frame``
        is one of FRAMES. ``tail``: the last stripe's blocks are cut to its bytes (see above).
        ``key``: the upload id a keyed frame's tags are seeded with."""
        if frame not in FRAMES:
            raise ValueError(f"frame must be one of {', '.join(FRAMES)}, got {frame!r}")
        for name, value in (
            ("data_shards", data_shards),
            ("parity_shards", parity_shards),
            ("block_size", block_size),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if data_shards + parity_shards > 256:
            raise ValueError(
                f"data_shards + parity_shards must be <= 256, got {data_shards + parity_shards}"
            )
        self.data_shards = data_shards
        self.parity_shards = parity_shards
        self.block_size = block_size
        self.frame = frame
        self.tail = tail
        self.tag_len, self._tag = FRAMES[frame]
        self._hasher = _HASHERS[frame]
        self._keyed = frame in KEYED_FRAMES
        self._base = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
        total = data_shards + parity_shards
        # zfec's m is the total shard count. Encoder/Decoder hold read-only tables and allocate
        # per call, so one instance is safe to share between CPU-pool threads.
        self._encoder = zfec.Encoder(data_shards, total)
        self._decoder = zfec.Decoder(data_shards, total)
        self._parity_nums = tuple(range(data_shards, total))

    @property
    def stripe_size(self) -> int:
        """File bytes per stripe: k * B."""
        return self.data_shards * self.block_size

    @property
    def framed_block(self) -> int:
        """Stored bytes per block: B + the tag length."""
        return self.block_size + self.tag_len

    def stripes(self, size: int) -> int:
        """Number of stripes for a file of ``size`` bytes."""
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        return -(-size // self.stripe_size)

    def block_len(self, stripe: int, size: int) -> int:
        """Bytes of each block of stripe ``stripe`` of a file of ``size`` bytes (without tag)."""
        if not self.tail or stripe < self.stripes(size) - 1:
            return self.block_size
        rest = size - stripe * self.stripe_size
        return max(1, -(-rest // self.data_shards))

    def block_span(self, stripe: int, size: int) -> tuple[int, int]:
        """Offset and length (tag included) of stripe ``stripe``'s block inside every shard."""
        return stripe * self.framed_block, self.block_len(stripe, size) + self.tag_len

    def shard_size(self, size: int) -> int:
        """Length of every shard of a file of ``size`` bytes."""
        stripes = self.stripes(size)
        if not stripes:
            return 0
        offset, length = self.block_span(stripes - 1, size)
        return offset + length

    def stripe_range(self, offset: int, length: int) -> tuple[int, int]:
        """First and last stripe index (inclusive) holding bytes [offset, offset + length)."""
        if offset < 0 or length < 1:
            raise ValueError(f"need offset >= 0 and length >= 1, got {offset}, {length}")
        return offset // self.stripe_size, (offset + length - 1) // self.stripe_size

    def _seed(self, index: int, number: int) -> int:
        """The tag seed of block ``index`` of stripe ``number`` (keyed frames)."""
        mixed = self._base ^ (index * 0x9E3779B97F4A7C15) ^ (number * 0xC2B2AE3D27D4EB4F)
        return mixed & 0xFFFFFFFFFFFFFFFF

    def encode_parts(self, stripe: Buffer, number: int = 0) -> list[tuple[Buffer, bytes]]:
        """Encode one stripe (at most stripe_size bytes; a shorter one is the file's last,
        zero-padded to k blocks) into k + m framed blocks, each as (block, tag): stored, a block
        is followed by its tag. Data blocks are views of ``stripe`` (no copy: a fresh buffer per
        block cost 3x zfec's time), so do not mutate it while the parts are in use."""
        size, bsize = self.stripe_size, self.block_size
        view = memoryview(stripe).cast("B")
        if view.nbytes > size:
            raise ValueError(f"stripe has {view.nbytes} bytes, more than {size}")
        if view.nbytes < size and self.tail:
            bsize = max(1, -(-view.nbytes // self.data_shards))
            size = bsize * self.data_shards
        if view.nbytes < size:
            padded = bytearray(size)
            padded[: view.nbytes] = view
            view = memoryview(padded)
        data = tuple(view[i * bsize : (i + 1) * bsize] for i in range(self.data_shards))
        parity = self._encoder.encode(data, self._parity_nums)
        blocks = (*data, *parity)
        if self._keyed:
            seed = self._seed
            return [(b, xxhash.xxh3_128_digest(b, seed(i, number))) for i, b in enumerate(blocks)]
        tag = self._tag
        return [(block, tag(block)) for block in blocks]

    def encode_stripe(self, stripe: Buffer, number: int = 0) -> list[bytes]:
        """``encode_parts`` joined: each framed block as stored."""
        return [b"".join(part) for part in self.encode_parts(stripe, number)]

    async def encode(self, stripe: Buffer, number: int = 0) -> list[tuple[Buffer, bytes]]:
        """``encode_parts`` of stripe ``number`` on the CPU pool; do not mutate ``stripe`` while
        the parts are used."""
        return await run_cpu(self.encode_parts, stripe, number)

    def unframe(self, framed: Buffer, index: int = 0, number: int = 0) -> memoryview | None:
        """The block inside ``framed`` (block ``index`` of stripe ``number``) if its tag
        matches (a view of it, no copy), else None."""
        parts = self.unframe_parts((framed,), index, number)
        return None if parts is None else parts[0]

    def unframe_parts(
        self, framed: Sequence[Buffer], index: int = 0, number: int = 0
    ) -> list[memoryview] | None:
        """``unframe`` of a framed block that arrived in pieces: the block as views of them (no
        copy), or None if its tag does not match or there is no block before the tag."""
        views = [memoryview(p).cast("B") for p in framed]
        size = sum(v.nbytes for v in views)
        if size <= self.tag_len:
            return None
        body_len = size - self.tag_len
        body: list[memoryview] = []
        tag = b""
        pos = 0
        for v in views:
            if pos + v.nbytes <= body_len:
                body.append(v)
            elif pos >= body_len:
                tag += v
            else:
                body.append(v[: body_len - pos])
                tag += v[body_len - pos :]
            pos += v.nbytes
        if len(body) == 1 and not self._keyed:
            digest = self._tag(body[0])
        else:
            hasher: _Hasher = (
                xxhash.xxh3_128(seed=self._seed(index, number)) if self._keyed else self._hasher()
            )
            for v in body:
                hasher.update(v)
            digest = hasher.digest()
        if not hmac.compare_digest(digest, tag):
            return None
        return body

    def decode_stripe(self, blocks: dict[int, Buffer], block_len: int = 0) -> bytes:
        """Rebuild the k*b stripe from >= k verified raw blocks of ``block_len`` bytes (default
        B; a tail layout's last stripe has shorter ones) keyed by shard index."""
        pieces = {i: [memoryview(b).cast("B")] for i, b in blocks.items()}
        return b"".join(self.decode_parts(pieces, block_len))

    def decode_parts(self, blocks: dict[int, list[memoryview]], block_len: int = 0) -> list[Buffer]:
        """``decode_stripe`` of blocks in pieces (``unframe_parts``): the stripe as pieces in
        order. When every data block is there they are the pieces themselves (no copy);
        otherwise the blocks used are joined and zfec rebuilds the missing data blocks."""
        bsize = block_len or self.block_size
        k = self.data_shards
        if self._fast_path(blocks, bsize):
            return [piece for i in range(k) for piece in blocks[i]]
        nums = self._pick(blocks, bsize)
        joined = tuple(b"".join(blocks[i]) for i in nums)
        return list(self._decoder.decode(joined, nums))

    async def decode(self, blocks: dict[int, list[memoryview]], block_len: int = 0) -> list[Buffer]:
        """``decode_parts``; on the CPU pool unless every data block is present."""
        if self._fast_path(blocks, block_len or self.block_size):
            return self.decode_parts(blocks, block_len)
        return await run_cpu(self.decode_parts, blocks, block_len)

    def _fast_path(self, blocks: dict[int, list[memoryview]], bsize: int) -> bool:
        return all(_size(blocks.get(i, ())) == bsize for i in range(self.data_shards))

    def _pick(self, blocks: dict[int, list[memoryview]], bsize: int) -> tuple[int, ...]:
        """k usable shard indices, data blocks first (zfec then only rebuilds the missing ones)."""
        total = self.data_shards + self.parity_shards
        usable = sorted(i for i, b in blocks.items() if 0 <= i < total and _size(b) == bsize)
        if len(usable) < self.data_shards:
            raise ValueError(f"need {self.data_shards} blocks of {bsize} bytes, got {len(usable)}")
        return tuple(usable[: self.data_shards])


def _size(pieces: Sequence[memoryview]) -> int:
    return sum(p.nbytes for p in pieces)
