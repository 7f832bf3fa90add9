"""The WorkQueue contract: every implementation (sqlite, postgres, redis, raft) passes each test."""

from __future__ import annotations

import asyncio

from callfs.daemon import make_work_queue
from callfs.jobs.base import WorkQueue
from callfs.tests.contract.factories import StoreHandle


def queue_of(handle: StoreHandle) -> WorkQueue:
    return make_work_queue(handle.store)


async def test_enqueue_claim_ack_in_order(store_handle: StoreHandle) -> None:
    q = queue_of(store_handle)
    assert await q.backlog() == 0
    assert await q.claim("w1", 10, 60.0, 100.0) == []
    for i in range(5):
        await q.enqueue("replica-put", f"k{i}", f"arg{i}", 1.0 + i)
    got = await q.claim("w1", 3, 60.0, 100.0)
    assert [(i.kind, i.key, i.arg, i.attempts) for i in got] == [
        ("replica-put", "k0", "arg0", 1),
        ("replica-put", "k1", "arg1", 1),
        ("replica-put", "k2", "arg2", 1),
    ]
    ids = [i.id for i in got]
    assert ids == sorted(ids)
    # leased: another worker gets only the rest
    other = await q.claim("w2", 10, 60.0, 100.0)
    assert [i.key for i in other] == ["k3", "k4"]
    assert await q.claim("w3", 10, 60.0, 100.0) == []
    # an ack by the wrong worker removes nothing; the holder's ack does
    await q.ack("w2", ids[:2])
    await q.ack("w1", ids[:2])
    await q.ack("w1", [])
    assert await q.backlog() == 3
    # survives a restart of the store
    store = await store_handle.reopen()
    q = make_work_queue(store)
    assert await q.backlog() == 3


async def test_expired_lease_and_retry(store_handle: StoreHandle) -> None:
    q = queue_of(store_handle)
    await q.enqueue("replica-delete", "k", "", 1.0)
    (first,) = await q.claim("dead-worker", 10, 30.0, 100.0)
    assert await q.claim("w2", 10, 30.0, 120.0) == []  # lease still running
    (again,) = await q.claim("w2", 10, 30.0, 131.0)  # lease ran out: another worker takes it
    assert again.id == first.id and again.attempts == 2
    await q.ack("dead-worker", [first.id])  # the old holder no longer owns it
    assert await q.backlog() == 1
    await q.retry("w2", [again.id], 500.0)
    assert await q.claim("w3", 10, 30.0, 499.0) == []  # backing off
    (third,) = await q.claim("w3", 10, 30.0, 500.0)
    assert third.attempts == 3
    await q.ack("w3", [third.id])
    assert await q.backlog() == 0


async def test_renew_extends_only_the_leases_the_worker_still_holds(
    store_handle: StoreHandle,
) -> None:
    q = queue_of(store_handle)
    for i in range(4):
        await q.enqueue("replica-put", f"k{i}", "", float(i))
    a, b, c = await q.claim("w1", 3, 30.0, 100.0)  # leased until 130
    (d,) = await q.claim("w2", 10, 100.0, 100.0)  # until 200
    await q.ack("w1", [c.id])
    # not d (another worker's), not c (acknowledged), not an unknown id; the answer ascends
    assert await q.renew("w1", [d.id, b.id, c.id, a.id, 10**9], 30.0, 120.0) == [a.id, b.id]
    assert await q.renew("w1", [], 30.0, 120.0) == []
    assert await q.claim("w3", 10, 30.0, 149.0) == []  # a and b renewed until 150, d still w2's
    assert await q.renew("w2", [d.id], 100.0, 120.0) == [d.id]  # until 220
    got = await q.claim("w3", 10, 30.0, 150.0)
    assert [(i.id, i.attempts) for i in got] == [(a.id, 2), (b.id, 2)]
    await q.ack("w3", [a.id, b.id])
    # an item handed back is not renewed (it stays due at its backoff time)
    await q.retry("w2", [d.id], 300.0)
    assert await q.renew("w2", [d.id], 100.0, 250.0) == []
    assert await q.claim("w3", 10, 30.0, 299.0) == []
    assert [i.id for i in await q.claim("w3", 10, 30.0, 300.0)] == [d.id]


async def test_an_expired_lease_is_renewed_until_another_worker_claims_the_item(
    store_handle: StoreHandle,
) -> None:
    q = queue_of(store_handle)
    await q.enqueue("replica-put", "k", "", 1.0)
    (first,) = await q.claim("w1", 10, 10.0, 100.0)  # until 110
    # ran out, but nobody took it: the holder may still keep it (until 125)
    assert await q.renew("w1", [first.id], 10.0, 115.0) == [first.id]
    assert await q.claim("w2", 10, 10.0, 124.0) == []
    (again,) = await q.claim("w2", 10, 10.0, 125.0)  # ran out again: w2 takes it, until 135
    assert again.id == first.id and again.attempts == 2
    # the old holder wakes up: its renewal does not touch w2's lease
    assert await q.renew("w1", [first.id], 10.0, 126.0) == []
    assert await q.claim("w3", 10, 10.0, 134.0) == []
    (third,) = await q.claim("w3", 10, 10.0, 135.0)
    assert third.attempts == 3
    await q.ack("w1", [first.id])  # nor does its acknowledgement remove it
    assert await q.backlog() == 1


async def test_concurrent_claims_never_share_an_item(store_handle: StoreHandle) -> None:
    q = queue_of(store_handle)
    for i in range(40):
        await q.enqueue("replica-put", f"k{i}", "", float(i))
    batches = await asyncio.gather(*(q.claim(f"w{n}", 7, 60.0, 1000.0) for n in range(8)))
    ids = [item.id for batch in batches for item in batch]
    assert len(ids) == len(set(ids)) == 40
