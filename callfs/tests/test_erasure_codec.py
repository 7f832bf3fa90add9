"""Codec: every k-subset round-trips, corruption is caught, edges and bad values are refused."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import random
from collections.abc import AsyncIterator

import pytest
import xxhash

from callfs.erasure.codec import DEFAULT_BLOCK, DEFAULT_FRAME, FRAMES, Codec

SEED = 20261130
PROFILES = [(1, 1), (2, 1), (3, 2), (4, 2)]


def _data(n: int, seed: int = SEED) -> bytes:
    return random.Random(seed + n).randbytes(n)


def _sizes(codec: Codec) -> list[int]:
    s = codec.stripe_size
    return [0, 1, s - 1, s, s + 1, 3 * s + 17]


def _encode_file(codec: Codec, data: bytes) -> list[bytes]:
    """Shard files (concatenated framed blocks) for ``data``."""
    shards = [bytearray() for _ in range(codec.data_shards + codec.parity_shards)]
    view = memoryview(data)
    for s in range(codec.stripes(len(data))):
        stripe = view[s * codec.stripe_size : (s + 1) * codec.stripe_size]
        offset, length = codec.block_span(s, len(data))
        for shard, framed in zip(shards, codec.encode_stripe(stripe, s), strict=True):
            assert len(shard) == offset
            assert len(framed) == length
            shard += framed
    return [bytes(s) for s in shards]


def _decode_file(codec: Codec, shards: dict[int, bytes], size: int) -> bytes:
    out = bytearray()
    for s in range(codec.stripes(size)):
        offset, length = codec.block_span(s, size)
        blocks = {}
        for i, shard in shards.items():
            block = codec.unframe(shard[offset : offset + length], i, s)
            assert block is not None
            blocks[i] = block
        out += codec.decode_stripe(blocks, codec.block_len(s, size))
    return bytes(out[:size])


@pytest.mark.parametrize(("k", "m"), PROFILES)
@pytest.mark.parametrize("block", [16, 64])
@pytest.mark.parametrize("frame", sorted(FRAMES))
@pytest.mark.parametrize("tail", [False, True])
def test_every_k_subset_round_trips(k: int, m: int, block: int, frame: str, tail: bool) -> None:
    codec = Codec(k, m, block, frame, tail=tail)
    tag = FRAMES[frame][0]
    for size in _sizes(codec):
        data = _data(size)
        shards = _encode_file(codec, data)
        assert all(len(s) == codec.shard_size(size) for s in shards)
        if not tail:
            assert codec.shard_size(size) == codec.stripes(size) * (block + tag)
        elif size:
            last = size - (codec.stripes(size) - 1) * codec.stripe_size
            expected = (codec.stripes(size) - 1) * (block + tag) + -(-last // k) + tag
            assert codec.shard_size(size) == expected
        for subset in itertools.combinations(range(k + m), k):
            got = _decode_file(codec, {i: shards[i] for i in subset}, size)
            assert got == data, (k, m, block, size, subset, tail)


def test_a_tail_layout_stores_a_small_file_at_its_size() -> None:
    """4+2 with 1 MiB blocks: a 10-byte file is six 3-byte blocks (+ tags), not six MiB; the
    padded layout it replaced stored whole blocks."""
    tail, padded = Codec(4, 2, DEFAULT_BLOCK, tail=True), Codec(4, 2, DEFAULT_BLOCK)
    assert tail.shard_size(10) == 3 + tail.tag_len
    assert padded.shard_size(10) == DEFAULT_BLOCK + padded.tag_len
    assert tail.block_len(0, 10) == 3
    assert tail.shard_size(tail.stripe_size) == padded.shard_size(tail.stripe_size)
    assert tail.shard_size(tail.stripe_size + 1) == DEFAULT_BLOCK + 1 + 2 * tail.tag_len
    framed = tail.encode_stripe(b"0123456789")
    assert [len(f) for f in framed] == [3 + tail.tag_len] * 6
    blocks = {i: tail.unframe(framed[i], i) for i in (1, 3, 4, 5)}
    got = tail.decode_stripe({i: b for i, b in blocks.items() if b is not None}, 3)
    assert got == b"0123456789" + bytes(2)


@pytest.mark.parametrize(("k", "m"), PROFILES)
@pytest.mark.parametrize("frame", sorted(FRAMES))
def test_systematic_data_blocks_are_raw_slices(k: int, m: int, frame: str) -> None:
    codec = Codec(k, m, 16, frame)
    stripe = _data(codec.stripe_size)
    framed = codec.encode_stripe(stripe)
    assert len(framed) == k + m
    tags = {
        "sha256": lambda b, _i: hashlib.sha256(b).digest(),
        "xxh3": lambda b, _i: xxhash.xxh3_128_digest(b),
        "xxh3k": lambda b, i: xxhash.xxh3_128_digest(b, codec._seed(i, 0)),
    }
    for i in range(k):
        raw = stripe[i * 16 : (i + 1) * 16]
        assert framed[i] == raw + tags[frame](raw, i)


def test_short_stripe_is_zero_padded() -> None:
    codec = Codec(3, 2, 16)
    data = b"abc"
    framed = codec.encode_stripe(bytearray(data))
    blocks = {i: codec.unframe(framed[i], i) for i in (1, 3, 4)}
    stripe = codec.decode_stripe({i: b for i, b in blocks.items() if b is not None})
    assert stripe == data + bytes(codec.stripe_size - 3)


def test_empty_file_has_no_stripes() -> None:
    codec = Codec(4, 2, 64)
    assert codec.stripes(0) == 0
    assert codec.shard_size(0) == 0
    assert _encode_file(codec, b"") == [b""] * 6


def test_oversized_stripe_rejected() -> None:
    codec = Codec(2, 1, 16)
    with pytest.raises(ValueError):
        codec.encode_stripe(bytes(33))


@pytest.mark.parametrize("where", ["data_first", "data_last", "hash_first", "hash_last"])
@pytest.mark.parametrize("frame", sorted(FRAMES))
def test_unframe_rejects_a_flipped_bit(where: str, frame: str) -> None:
    codec = Codec(2, 1, 64, frame)
    last = 64 + codec.tag_len - 1
    for i, framed in enumerate(codec.encode_stripe(_data(100))):
        assert codec.unframe(framed, i) is not None
        assert codec.unframe(memoryview(framed), i) == framed[:64]
        pos = {"data_first": 0, "data_last": 63, "hash_first": 64, "hash_last": last}[where]
        for bit in range(8):
            bad = bytearray(framed)
            bad[pos] ^= 1 << bit
            assert codec.unframe(bytes(bad), i) is None


@pytest.mark.parametrize("frame", sorted(FRAMES))
def test_unframe_rejects_wrong_lengths(frame: str) -> None:
    codec = Codec(1, 1, 16, frame)
    assert codec.unframe(b"") is None
    assert codec.unframe(codec.encode_stripe(b"")[0][16:]) is None  # a bare tag is never valid
    assert codec.unframe(hashlib.sha256(b"").digest()) is None
    framed = codec.encode_stripe(b"x" * 16)[0]
    assert codec.unframe(framed[:-1]) is None
    assert codec.unframe(framed + b"\0") is None


def test_frames_differ_and_are_checked() -> None:
    """A shard framed with one tag is refused by a reader of the other: the layout's frame
    must match what was written (a legacy layout reads SHA-256 frames, a new one XXH3)."""
    assert DEFAULT_FRAME == "xxh3k"
    new, legacy = Codec(2, 1, 64, "xxh3"), Codec(2, 1, 64, "sha256")
    assert (new.framed_block, legacy.framed_block) == (80, 96)
    for framed in new.encode_stripe(_data(128)):
        assert legacy.unframe(framed) is None
    with pytest.raises(ValueError):
        Codec(2, 1, 64, "md5")


@pytest.mark.parametrize("frame", sorted(FRAMES))
def test_corrupt_shard_is_never_decoded(frame: str) -> None:
    """One corrupted shard: rejected by unframe, and the rest still rebuilds the right bytes."""
    codec = Codec(3, 2, 16, frame)
    data = _data(3 * codec.stripe_size + 17)
    shards = _encode_file(codec, data)
    bad = bytearray(shards[1])
    bad[codec.framed_block + 5] ^= 0x10  # stripe 1, block bytes
    fb = codec.framed_block
    out = bytearray()
    for s in range(codec.stripes(len(data))):
        blocks = {}
        for i, shard in enumerate([*shards[:1], bytes(bad), *shards[2:]]):
            block = codec.unframe(shard[s * fb : (s + 1) * fb], i, s)
            if block is not None:
                blocks[i] = block
        assert (1 in blocks) == (s != 1)
        out += codec.decode_stripe(blocks)
    assert bytes(out[: len(data)]) == data


def test_decode_with_fewer_than_k_blocks() -> None:
    codec = Codec(3, 2, 16)
    framed = codec.encode_stripe(_data(48))
    blocks = {i: codec.unframe(f, i) for i, f in enumerate(framed)}
    with pytest.raises(ValueError):
        codec.decode_stripe({0: blocks[0], 4: blocks[4]})  # type: ignore[dict-item]
    with pytest.raises(ValueError):
        codec.decode_stripe({})
    with pytest.raises(ValueError):  # a wrong-length block does not count
        codec.decode_stripe({0: blocks[0], 3: blocks[3], 4: b"short"})  # type: ignore[dict-item]
    with pytest.raises(ValueError):  # an out-of-range index does not count
        codec.decode_stripe({0: blocks[0], 3: blocks[3], 9: blocks[4]})  # type: ignore[dict-item]


@pytest.mark.parametrize(
    ("k", "m", "block"),
    [
        (0, 1, 16),
        (1, 0, 16),
        (-1, 1, 16),
        (1, 1, 0),
        (1, 1, -5),
        (200, 57, 16),
        (256, 1, 16),
        (True, 1, 16),
        (1.0, 1, 16),
    ],
)
def test_bad_constructor_values(k: int, m: int, block: int) -> None:
    with pytest.raises(ValueError):
        Codec(k, m, block)


def test_constructor_limits_accepted() -> None:
    codec = Codec(255, 1, 1)
    assert codec.stripe_size == 255
    assert codec.framed_block == 1 + 16
    assert Codec(1, 255).block_size == DEFAULT_BLOCK


def test_stripe_range_edges() -> None:
    codec = Codec(2, 1, 16)  # stripe = 32 bytes
    assert codec.stripe_range(0, 1) == (0, 0)
    assert codec.stripe_range(0, 32) == (0, 0)
    assert codec.stripe_range(0, 33) == (0, 1)
    assert codec.stripe_range(31, 1) == (0, 0)
    assert codec.stripe_range(31, 2) == (0, 1)
    assert codec.stripe_range(32, 1) == (1, 1)
    assert codec.stripe_range(33, 64) == (1, 3)
    assert codec.stripe_range(64, 32) == (2, 2)
    for bad in [(0, 0), (5, -1), (-1, 4)]:
        with pytest.raises(ValueError):
            codec.stripe_range(*bad)
    with pytest.raises(ValueError):
        codec.stripes(-1)


def test_stripes_and_shard_size() -> None:
    codec = Codec(4, 2, 64)  # stripe = 256
    assert [codec.stripes(n) for n in (0, 1, 255, 256, 257, 3 * 256 + 17)] == [0, 1, 1, 1, 2, 4]
    assert codec.shard_size(257) == 2 * 80


async def test_async_round_trip_real_block() -> None:
    """1 MiB blocks, 4+2, short tail, through the CPU pool: fast path and two lost data
    shards."""
    codec = Codec(4, 2, tail=True)
    assert codec.block_size == 1024 * 1024
    data = _data(2 * codec.stripe_size + 12_345)
    out_fast, out_slow = bytearray(), bytearray()
    for s in range(codec.stripes(len(data))):
        stripe = data[s * codec.stripe_size : (s + 1) * codec.stripe_size]
        framed = [b"".join(part) for part in await codec.encode(memoryview(stripe), s)]
        assert [len(f) for f in framed] == [codec.block_span(s, len(data))[1]] * 6
        blocks = {i: codec.unframe(f, i, s) for i, f in enumerate(framed)}
        assert all(b is not None for b in blocks.values())
        raw: dict[int, bytes] = {i: b for i, b in blocks.items() if b is not None}
        block = codec.block_len(s, len(data))
        out_fast += b"".join(await codec.decode({i: [b] for i, b in raw.items()}, block))
        slow = {i: [raw[i]] for i in (0, 3, 4, 5)}
        out_slow += b"".join(await codec.decode(slow, block))
    assert bytes(out_fast[: len(data)]) == data
    assert bytes(out_slow[: len(data)]) == data
    with pytest.raises(ValueError):
        await codec.decode({0: [raw[0]], 5: [raw[5]]})


async def test_shared_coder_is_thread_safe() -> None:
    """Many stripes in flight on the CPU pool give the same bytes as one at a time."""
    codec = Codec(4, 2, 4096)
    stripes = [_data(codec.stripe_size, seed=i) for i in range(64)]
    want = [codec.encode_stripe(s) for s in stripes]
    got = await asyncio.gather(*(codec.encode(s) for s in stripes))
    assert [[b"".join(part) for part in parts] for parts in got] == want
    lost = [{i: [codec.unframe(f[i], i) or memoryview(b"")] for i in (2, 3, 4, 5)} for f in want]
    rebuilt = await asyncio.gather(*(codec.decode(b) for b in lost))
    assert [b"".join(parts) for parts in rebuilt] == stripes


def test_stored_layouts_keep_their_frame_and_old_ones_read_as_sha256() -> None:
    import msgpack

    from callfs.metadata.common import pack_layout, unpack_layout
    from callfs.model import ErasureLayout, ShardInfo

    shard = ShardInfo(0, "n1", "localfs", ".erasure/u/0", 80, "ab" * 32)
    layout = ErasureLayout("u", 10, 1, 1, 80, "u", (shard,), 64, "xxh3", tail=True)
    assert unpack_layout(pack_layout(layout)) == layout
    old = msgpack.unpackb(pack_layout(layout), raw=False)
    del old["frame"], old["tail"]
    assert unpack_layout(msgpack.packb(old, use_bin_type=True)).frame == "sha256"
    assert unpack_layout(msgpack.packb(old, use_bin_type=True)).tail is False


@pytest.mark.parametrize("frame", sorted(FRAMES))
def test_unframe_parts_at_every_split(frame: str) -> None:
    """A framed block that arrived in pieces (split anywhere, the tag included) is verified and
    returned as views of the pieces; a flipped bit in any piece is refused."""
    codec = Codec(2, 1, 40, frame)
    framed = codec.encode_stripe(_data(80))[2]
    block = framed[:40]
    rnd = random.Random(SEED)
    for cut in range(len(framed) + 1):
        for pieces in ([framed[:cut], framed[cut:]], _split(framed, rnd)):
            got = codec.unframe_parts(pieces, 2)
            assert got is not None and b"".join(got) == block
            for i, piece in enumerate(pieces):
                if piece:
                    bad = list(pieces)
                    flipped = bytearray(piece)
                    flipped[rnd.randrange(len(piece))] ^= 0x10
                    bad[i] = bytes(flipped)
                    assert codec.unframe_parts(bad, 2) is None
    assert codec.unframe_parts([framed[:-1]]) is None
    assert codec.unframe_parts([b"", framed[: codec.tag_len]]) is None


def _split(data: bytes, rnd: random.Random) -> list[bytes]:
    cuts = sorted(rnd.sample(range(len(data) + 1), 3))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


async def test_read_parts_cuts_a_stream_into_exact_blocks() -> None:
    """Blocks of any lengths come out of a stream of any chunking, byte-exact, without joins;
    the last one is short when the stream ends."""
    from callfs.erasure.shards import Pending, read_parts

    data = _data(10_000)
    rnd = random.Random(SEED)

    async def chunks() -> AsyncIterator[bytes]:
        pos = 0
        while pos < len(data):
            n = rnd.randrange(1, 700)
            yield data[pos : pos + n]
            pos += n

    it, pending, pos = chunks(), Pending(), 0
    while pos < len(data):
        n = rnd.randrange(1, 1500)
        parts = await read_parts(it, pending, n)
        assert b"".join(parts) == data[pos : pos + n]
        assert all(isinstance(p, memoryview) for p in parts)
        pos += n
    assert await read_parts(it, pending, 10) == []


def test_a_keyed_tag_refuses_a_block_from_another_place() -> None:
    """A plain tag accepted a whole shard of another upload, or another shard of the same file,
    put in its place (a review read such a swap as 200 with wrong bytes). The keyed frame seeds
    each tag with the upload id, the shard index and the stripe number: a block is accepted only
    where it was written."""
    data = _data(2 * 64 * 2)
    mine, theirs = Codec(2, 1, 64, "xxh3k", key="a" * 32), Codec(2, 1, 64, "xxh3k", key="b" * 32)
    first = mine.encode_stripe(data[:128], 0)
    second = mine.encode_stripe(data[128:], 1)
    assert mine.unframe(first[1], 1, 0) is not None
    assert mine.unframe(first[1], 0, 0) is None  # another shard's block
    assert mine.unframe(second[1], 1, 0) is None  # another stripe's block
    assert theirs.unframe(first[1], 1, 0) is None  # another upload's block
    plain = Codec(2, 1, 64, "xxh3")
    assert plain.unframe(plain.encode_stripe(data[:128])[1], 0, 5) is not None  # the old flaw
