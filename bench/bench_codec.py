"""Erasure codec figures: Codec.encode / Codec.decode throughput over 256 MiB of random data next
to raw zfec Encoder / Decoder on the same stripes, in one run (goal: codec >= 0.9x raw zfec).

    python bench/bench_codec.py [--mib 256] [--runs 3] [--block 262144]

Profiles 2+1 and 4+2; one stripe at a time ("seq") and two stripes in flight ("x2", both through
callfs.concurrency.run_cpu). Decode loses min(m, k) data blocks so zfec has to rebuild them. The
codec does more than zfec: it tags every block (XXH3-128, the default frame) without copying it
(encode), and joins the stripe (decode); "unframe + decode_stripe" is the whole verified read
path. "raw zfec + sha256" is zfec plus hashlib over the same k+m blocks: the floor of the former
per-block SHA-256 frame. "seq" rows of Codec include one CPU-pool hop per stripe, so they are
compared with raw zfec both inline and through run_cpu. Rows of one group run alternately (the
machine is shared). MiB of file data per second, best of --runs. This script imports zfec
directly only to measure the reference.

glibc serves each fresh 256 KiB buffer with mmap and page-faults it in; run once more with
MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=268435456 to see that cost go away.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import time
from collections.abc import Awaitable, Callable

import zfec

from callfs.concurrency import run_cpu, shutdown_pools
from callfs.erasure.codec import Codec

Job = Callable[[int], Awaitable[object]]


async def run(jobs: int, job: Job, inflight: int) -> float:
    """Run job(0..jobs-1) with at most ``inflight`` pending; return wall seconds."""
    start = time.perf_counter()
    if inflight == 1:
        for i in range(jobs):
            await job(i)
    else:
        nxt = 0

        async def worker() -> None:
            nonlocal nxt
            while nxt < jobs:
                i = nxt
                nxt += 1
                await job(i)

        await asyncio.gather(*(worker() for _ in range(inflight)))
    return time.perf_counter() - start


async def profile(data: memoryview, k: int, m: int, block: int, runs: int) -> list[str]:
    codec = Codec(k, m, block)
    enc, dec = zfec.Encoder(k, k + m), zfec.Decoder(k, k + m)
    parity_nums = tuple(range(k, k + m))
    size = codec.stripe_size
    n = len(data) // size
    stripes = [data[s * size : (s + 1) * size] for s in range(n)]
    slices = [tuple(st[i * block : (i + 1) * block] for i in range(k)) for st in stripes]
    mib = n * size / 2**20

    # Decode inputs: min(m, k) data blocks lost, replaced by the first parity blocks.
    lost = min(m, k)
    nums = (*range(lost, k), *range(k, k + lost))
    framed_all = [codec.encode_stripe(st) for st in stripes]
    raw_in = [
        {i: (sl[i] if i < k else bytes(fr[i][:block])) for i in nums}
        for sl, fr in zip(slices, framed_all, strict=True)
    ]
    framed_in = [{i: fr[i] for i in nums} for fr in framed_all]
    full_in = [{i: bytes(fr[i][:block]) for i in range(k)} for fr in framed_all]
    del framed_all

    def raw_encode(i: int) -> object:
        return enc.encode(slices[i], parity_nums)

    def raw_decode(i: int) -> object:
        blocks = raw_in[i]
        return dec.decode(tuple(blocks[j] for j in nums), nums)

    def sha_only(i: int) -> object:
        return [hashlib.sha256(b).digest() for b in slices[i]] + [
            hashlib.sha256(raw_in[i][j]).digest() for j in nums[-m:] if j >= k
        ]

    async def inline(fn: Callable[[int], object], i: int) -> object:
        return fn(i)

    async def unframe_decode(i: int) -> bytes:
        def work() -> bytes:
            blocks = {j: codec.unframe(f, j) for j, f in framed_in[i].items()}
            return codec.decode_stripe({j: b for j, b in blocks.items() if b is not None})

        return await run_cpu(work)

    def zfec_sha(i: int) -> object:
        return raw_encode(i), sha_only(i)

    codec_enc: Job = lambda i: codec.encode(stripes[i])  # noqa: E731
    # Codec.decode takes each block as the pieces it arrived in
    pieces_in = [{j: [memoryview(b)] for j, b in blocks.items()} for blocks in raw_in]
    full_pcs = [{j: [memoryview(b)] for j, b in blocks.items()} for blocks in full_in]
    codec_dec: Job = lambda i: codec.decode(pieces_in[i])  # noqa: E731
    # (label, job, in flight); rows sharing a group run alternately, so drift hits them alike.
    groups: list[list[tuple[str, Job, int]]] = [
        [
            ("encode seq  raw zfec (inline)", lambda i: inline(raw_encode, i), 1),
            ("encode seq  raw zfec (run_cpu)", lambda i: run_cpu(raw_encode, i), 1),
            ("encode seq  raw zfec + sha256 (inline)", lambda i: inline(zfec_sha, i), 1),
            ("encode seq  sha256 only (inline)", lambda i: inline(sha_only, i), 1),
            ("encode seq  Codec.encode", codec_enc, 1),
        ],
        [
            ("encode x2   raw zfec (run_cpu)", lambda i: run_cpu(raw_encode, i), 2),
            ("encode x2   raw zfec + sha256 (run_cpu)", lambda i: run_cpu(zfec_sha, i), 2),
            ("encode x2   Codec.encode", codec_enc, 2),
        ],
        [
            ("decode seq  raw zfec (inline)", lambda i: inline(raw_decode, i), 1),
            ("decode seq  raw zfec (run_cpu)", lambda i: run_cpu(raw_decode, i), 1),
            ("decode seq  Codec.decode", codec_dec, 1),
            ("decode seq  unframe + decode_stripe (run_cpu)", unframe_decode, 1),
            ("decode seq  Codec.decode, all data present", lambda i: codec.decode(full_pcs[i]), 1),
        ],
        [
            ("decode x2   raw zfec (run_cpu)", lambda i: run_cpu(raw_decode, i), 2),
            ("decode x2   Codec.decode", codec_dec, 2),
            ("decode x2   unframe + decode_stripe (run_cpu)", unframe_decode, 2),
        ],
    ]
    out = [f"--- {k}+{m}, block {block // 1024} KiB, {n} stripes, {mib:.0f} MiB ---"]
    speed: dict[str, float] = {}
    for group in groups:
        secs = {name: float("inf") for name, _, _ in group}
        for _ in range(runs):
            for name, job, inflight in group:
                secs[name] = min(secs[name], await run(n, job, inflight))
        for name, _, _ in group:
            speed[name] = mib / secs[name]
            out.append(f"{name:48s} {speed[name]:7.0f} MiB/s")
    pairs = [
        ("encode seq  Codec.encode", "encode seq  raw zfec (inline)"),
        ("encode seq  Codec.encode", "encode seq  raw zfec (run_cpu)"),
        ("encode seq  Codec.encode", "encode seq  raw zfec + sha256 (inline)"),
        ("encode x2   Codec.encode", "encode x2   raw zfec (run_cpu)"),
        ("encode x2   Codec.encode", "encode x2   raw zfec + sha256 (run_cpu)"),
        ("decode seq  Codec.decode", "decode seq  raw zfec (inline)"),
        ("decode seq  Codec.decode", "decode seq  raw zfec (run_cpu)"),
        ("decode x2   Codec.decode", "decode x2   raw zfec (run_cpu)"),
        ("decode x2   unframe + decode_stripe (run_cpu)", "decode x2   raw zfec (run_cpu)"),
    ]
    for mine, ref in pairs:
        out.append(f"ratio  {mine[12:]} {mine[7:10]} / {ref[12:]}: {speed[mine] / speed[ref]:.2f}x")
    return out


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--block", type=int, default=256 * 1024)
    args = ap.parse_args()
    data = memoryview(os.urandom(args.mib * 2**20))
    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    print(f"cpus: {os.cpu_count()}; {args.mib} MiB random data; best of {args.runs}; {malloc}")
    try:
        for k, m in ((2, 1), (4, 2)):
            for line in await profile(data, k, m, args.block, args.runs):
                print(line, flush=True)
    finally:
        shutdown_pools()


if __name__ == "__main__":
    asyncio.run(main())
