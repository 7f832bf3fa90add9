"""``_ErasureStream``'s read-ahead (a feeder task and a queue of stripe rebuilds) against a stand-in
stripe reader, for the orderings a real cluster produces rarely: a stripe failing while the
queue is full and the client leaves, and a close from another task than the one reading.
Reads through real shards are in ``functional/test_erasure.py`` and ``cluster_tests/``."""

from __future__ import annotations

import asyncio
import gc
from types import SimpleNamespace
from typing import Any

import pytest

from callfs.erasure.service import _ErasureStream
from callfs.errors import InsufficientShards, InternalError

STRIPE = 10


class _Reader:
    """Stripe ``n`` is ``STRIPE`` bytes of ``n``; ``fail_at`` raises InsufficientShards; stripes
    from ``stall_at`` on never arrive."""

    def __init__(self, fail_at: int = -1, stall_at: int = -1) -> None:
        self._codec = SimpleNamespace(stripe_size=STRIPE)
        self.fail_at = fail_at
        self.stall_at = stall_at
        self.closed = False

    async def stripe_blocks(self, number: int) -> dict[int, list[memoryview]]:
        if number == self.stall_at:
            await asyncio.sleep(3600)
        if number == self.fail_at:
            raise InsufficientShards()
        return {0: [memoryview(bytes([number]) * STRIPE)]}

    async def decode(self, number: int, blocks: dict[int, list[memoryview]]) -> list[Any]:
        return [blocks[0][0]]

    async def aclose(self) -> None:
        self.closed = True


def _stream(reader: _Reader, stripes: int) -> Any:
    first = [memoryview(bytes([0]) * STRIPE)]
    return _ErasureStream(reader, range(1, stripes), 0, stripes * STRIPE, 0, first)  # type: ignore[arg-type]


async def test_a_failure_queued_behind_a_full_queue_is_not_logged_when_the_client_leaves() -> None:
    loop = asyncio.get_running_loop()
    logged: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: logged.append(context))
    reader = _Reader(fail_at=3)
    stream = _stream(reader, 8)
    it = aiter(stream)
    assert bytes(await anext(it)) == bytes([0]) * STRIPE
    for _ in range(20):  # the feeder fills the queue, then waits to queue stripe 3's failure
        await asyncio.sleep(0)
    await stream.aclose()
    await it.aclose()
    del stream, it
    gc.collect()
    await asyncio.sleep(0)
    assert reader.closed
    assert logged == []


async def test_the_failure_reaches_the_reader_after_every_stripe_before_it() -> None:
    stream = _stream(_Reader(fail_at=3), 8)
    got = []
    with pytest.raises(InsufficientShards):
        async for piece in stream:
            got.append(bytes(piece)[0])
    await stream.aclose()
    assert got == [0, 1, 2]


async def test_a_close_from_another_task_fails_the_waiting_reader_instead_of_hanging() -> None:
    reader = _Reader(stall_at=2)
    stream = _stream(reader, 8)

    async def consume() -> list[int]:
        return [bytes(piece)[0] async for piece in stream]

    consumer = asyncio.ensure_future(consume())
    for _ in range(20):  # stripes 0 and 1 sent; the reader waits for stripe 2
        await asyncio.sleep(0)
    await asyncio.gather(stream.aclose(), stream.aclose())  # twice at once: one close
    with pytest.raises(InternalError, match="closed"):
        await asyncio.wait_for(consumer, 5)
    assert reader.closed
