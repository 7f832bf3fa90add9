"""Reed-Solomon stripe codec: the only importer of zfec.

Layout (internal, API.md §11.2): stripe ``s`` of a file is bytes ``[s*k*B, (s+1)*k*B)``, the last
one zero-padded to ``k*B``. It is cut into ``k`` blocks of ``B`` bytes and encoded into ``k+m``
blocks; shard ``i`` holds block ``i`` of every stripe in order. Each block is stored framed: the
``B`` block bytes then a tag over them, so a reader verifies a block before using it. A shard is
``stripes(size) * (B + tag length)`` bytes; an empty file has no stripes and empty shards.

The tag (the layout's ``frame``) is a 128-bit XXH3 (``xxh3``, 16 bytes) for layouts written since
it replaced the 32-byte SHA-256 (``sha256``, still read). It guards against bit rot, torn writes
and a wrong shard, not against someone who can rewrite shard files (they could rewrite the tag
too); that is what the whole-shard SHA-256 in the layout is for (API.md §11.3). XXH3 runs at tens
of GB/s where SHA-256 runs near 1.3 GB/s on this class of machine, so the codec stays at zfec's
speed (``bench/bench_codec.py``).

zfec has no integrity check (a flipped bit decodes silently to wrong bytes): only pass blocks that
``unframe`` accepted to ``decode``.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable

import xxhash
import zfec

from callfs.concurrency import run_cpu

DEFAULT_BLOCK = 256 * 1024
#: Frame tag of new layouts; layouts without a ``frame`` were written with ``sha256``.
DEFAULT_FRAME = "xxh3"
LEGACY_FRAME = "sha256"


def _sha256(block: bytes | memoryview) -> bytes:
    return hashlib.sha256(block).digest()


#: Frame kind -> (tag length, tag function).
FRAMES: dict[str, tuple[int, Callable[[bytes | memoryview], bytes]]] = {
    "xxh3": (16, xxhash.xxh3_128_digest),
    "sha256": (32, _sha256),
}

Buffer = bytes | bytearray | memoryview


class Codec:
    """Encodes and decodes one stripe at a time with ``data_shards`` + ``parity_shards`` shards."""

    def __init__(
        self,
        data_shards: int,
        parity_shards: int,
        block_size: int = DEFAULT_BLOCK,
        frame: str = DEFAULT_FRAME,
    ) -> None:
        """Raise ValueError unless k >= 1, m >= 1, k + m <= 256, block_size >= 1 and ``frame``
        is one of FRAMES."""
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
        self.tag_len, self._tag = FRAMES[frame]
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

    def shard_size(self, size: int) -> int:
        """Length of every shard of a file of ``size`` bytes."""
        return self.stripes(size) * self.framed_block

    def stripe_range(self, offset: int, length: int) -> tuple[int, int]:
        """First and last stripe index (inclusive) holding bytes [offset, offset + length)."""
        if offset < 0 or length < 1:
            raise ValueError(f"need offset >= 0 and length >= 1, got {offset}, {length}")
        return offset // self.stripe_size, (offset + length - 1) // self.stripe_size

    def encode_parts(self, stripe: Buffer) -> list[tuple[Buffer, bytes]]:
        """Encode one stripe (at most stripe_size bytes, zero-padded) into k + m framed blocks,
        each as (block, tag): stored, a block is followed by its tag. Data blocks are views of
        ``stripe`` (no copy: a fresh 256 KiB buffer per block cost 3x zfec's time), so do not
        mutate it while the parts are in use."""
        size, bsize = self.stripe_size, self.block_size
        view = memoryview(stripe).cast("B")
        if view.nbytes > size:
            raise ValueError(f"stripe has {view.nbytes} bytes, more than {size}")
        if view.nbytes < size:
            padded = bytearray(size)
            padded[: view.nbytes] = view
            view = memoryview(padded)
        data = tuple(view[i * bsize : (i + 1) * bsize] for i in range(self.data_shards))
        parity = self._encoder.encode(data, self._parity_nums)
        tag = self._tag
        return [(block, tag(block)) for block in (*data, *parity)]

    def encode_stripe(self, stripe: Buffer) -> list[bytes]:
        """``encode_parts`` joined: each framed block as stored."""
        return [b"".join(part) for part in self.encode_parts(stripe)]

    async def encode(self, stripe: Buffer) -> list[tuple[Buffer, bytes]]:
        """``encode_parts`` on the CPU pool; do not mutate ``stripe`` while the parts are used."""
        return await run_cpu(self.encode_parts, stripe)

    def unframe(self, framed: Buffer) -> memoryview | None:
        """The block inside ``framed`` if its tag matches (a view of it, no copy), else None."""
        view = memoryview(framed).cast("B")
        tag_len = self.tag_len
        if view.nbytes <= tag_len:
            return None
        block = view[:-tag_len]
        if not hmac.compare_digest(self._tag(block), view[-tag_len:]):
            return None
        return block

    def decode_stripe(self, blocks: dict[int, Buffer]) -> bytes:
        """Rebuild the k*B stripe from >= k verified raw blocks keyed by shard index."""
        k = self.data_shards
        if self._fast_path(blocks):
            return b"".join(blocks[i] for i in range(k))
        nums = self._pick(blocks)
        primary = self._decoder.decode(tuple(blocks[i] for i in nums), nums)
        return b"".join(primary)

    async def decode(self, blocks: dict[int, Buffer]) -> bytes:
        """``decode_stripe``; on the CPU pool unless every data block is present."""
        if self._fast_path(blocks):
            return self.decode_stripe(blocks)
        return await run_cpu(self.decode_stripe, blocks)

    def _fast_path(self, blocks: dict[int, Buffer]) -> bool:
        bsize = self.block_size
        return all(len(blocks.get(i, b"")) == bsize for i in range(self.data_shards))

    def _pick(self, blocks: dict[int, Buffer]) -> tuple[int, ...]:
        """k usable shard indices, data blocks first (zfec then only rebuilds the missing ones)."""
        total = self.data_shards + self.parity_shards
        usable = sorted(
            i for i, b in blocks.items() if 0 <= i < total and len(b) == self.block_size
        )
        if len(usable) < self.data_shards:
            raise ValueError(
                f"need {self.data_shards} blocks of {self.block_size} bytes, got {len(usable)}"
            )
        return tuple(usable[: self.data_shards])
