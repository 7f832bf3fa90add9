"""Reed-Solomon stripe codec: the only importer of zfec.

Layout (internal, API.md §11.2): stripe ``s`` of a file is bytes ``[s*k*B, (s+1)*k*B)``, the last
one zero-padded to ``k*B``. It is cut into ``k`` blocks of ``B`` bytes and encoded into ``k+m``
blocks; shard ``i`` holds block ``i`` of every stripe in order. Each block is stored framed: the
``B`` block bytes then their 32-byte SHA-256, so a reader verifies a block before using it. A shard
is ``stripes(size) * (B + 32)`` bytes; an empty file has no stripes and empty shards.

zfec has no integrity check (a flipped bit decodes silently to wrong bytes): only pass blocks that
``unframe`` accepted to ``decode``.
"""

from __future__ import annotations

import hashlib
import hmac

import zfec

from callfs.concurrency import run_cpu

DEFAULT_BLOCK = 256 * 1024
HASH_LEN = 32

Buffer = bytes | bytearray | memoryview


class Codec:
    """Encodes and decodes one stripe at a time with ``data_shards`` + ``parity_shards`` shards."""

    def __init__(
        self, data_shards: int, parity_shards: int, block_size: int = DEFAULT_BLOCK
    ) -> None:
        """Raise ValueError unless k >= 1, m >= 1, k + m <= 256 and block_size >= 1."""
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
        """Stored bytes per block: B + HASH_LEN."""
        return self.block_size + HASH_LEN

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

    def encode_stripe(self, stripe: Buffer) -> list[bytes]:
        """Encode one stripe (at most stripe_size bytes, zero-padded) into k + m framed blocks."""
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
        return [_frame(block) for block in (*data, *parity)]

    async def encode(self, stripe: Buffer) -> list[bytes]:
        """``encode_stripe`` on the CPU pool; do not mutate ``stripe`` until it returns."""
        return await run_cpu(self.encode_stripe, stripe)

    @staticmethod
    def unframe(framed: bytes | memoryview) -> bytes | None:
        """The block inside ``framed`` if its SHA-256 matches, else None."""
        view = memoryview(framed).cast("B")
        if view.nbytes <= HASH_LEN:
            return None
        block = view[:-HASH_LEN]
        if not hmac.compare_digest(hashlib.sha256(block).digest(), view[-HASH_LEN:]):
            return None
        return bytes(block)

    def decode_stripe(self, blocks: dict[int, bytes]) -> bytes:
        """Rebuild the k*B stripe from >= k verified raw blocks keyed by shard index."""
        k = self.data_shards
        if self._fast_path(blocks):
            return b"".join(blocks[i] for i in range(k))
        nums = self._pick(blocks)
        primary = self._decoder.decode(tuple(blocks[i] for i in nums), nums)
        return b"".join(primary)

    async def decode(self, blocks: dict[int, bytes]) -> bytes:
        """``decode_stripe``; on the CPU pool unless every data block is present."""
        if self._fast_path(blocks):
            return self.decode_stripe(blocks)
        return await run_cpu(self.decode_stripe, blocks)

    def _fast_path(self, blocks: dict[int, bytes]) -> bool:
        bsize = self.block_size
        return all(len(blocks.get(i, b"")) == bsize for i in range(self.data_shards))

    def _pick(self, blocks: dict[int, bytes]) -> tuple[int, ...]:
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


def _frame(block: bytes | memoryview) -> bytes:
    return b"".join((block, hashlib.sha256(block).digest()))
