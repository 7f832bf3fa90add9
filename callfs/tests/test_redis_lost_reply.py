"""A Redis EXEC that was applied but whose reply was lost (the connection dropped after Redis
ran it). redis-py reports any connection loss while keys are watched as a ``WatchError``, which
the store took as "someone else changed a key" and decided the command again on fresh reads. It
then saw its own write: an update "replaced" the entry it had just written (the engine reclaimed
the new bytes: an acknowledged PUT that no longer reads), a create answered 409 over its own
entry, a delete 404. Found by a crash-safety review, which demonstrated the PUT case."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio.client as redis_client
import redis.exceptions

from callfs.core.engine import Engine, EngineSettings
from callfs.locks.local import LocalLockManager
from callfs.metadata.redis import RedisMetadataStore
from callfs.model import Identity
from callfs.paths import CanonicalPath
from callfs.storage.localfs import LocalFSBackend
from callfs.tests.contract.factories import make_metadata_store


class ReplyLoss:
    """Makes the next MULTI/EXEC lose its reply after Redis applied it (or before, with
    ``applied`` False: the connection dropped while the EXEC was on its way)."""

    def __init__(self) -> None:
        self.armed = False
        self.applied = True
        self.fired = 0

    def arm(self, *, applied: bool = True) -> None:
        self.armed, self.applied = True, applied


@pytest.fixture
def loss(monkeypatch: pytest.MonkeyPatch) -> Iterator[ReplyLoss]:
    state = ReplyLoss()
    real = redis_client.Pipeline._execute_transaction

    async def lossy(self: Any, conn: Any, commands: Any, raise_on_error: bool) -> Any:
        if not state.armed:
            return await real(self, conn, commands, raise_on_error)
        state.armed = False
        state.fired += 1
        if state.applied:
            await real(self, conn, commands, raise_on_error)
        # as redis-py does for a connection lost while watching (it clears ``watching`` only
        # once the EXEC reply is parsed): the caller sees a WatchError
        await conn.disconnect()
        self.watching = True
        await self._disconnect_raise_on_watching(
            conn, redis.exceptions.ConnectionError("reply lost"), None, None, "MULTI"
        )
        raise AssertionError("not reached")  # pragma: no cover

    monkeypatch.setattr(redis_client.Pipeline, "_execute_transaction", lossy)
    yield state


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[Engine]:
    async with make_metadata_store("redis", tmp_path) as handle:
        assert isinstance(handle.store, RedisMetadataStore)
        fs = LocalFSBackend(str(tmp_path / "files"))
        await fs.start()
        settings = EngineSettings(instance_id="n1", default_backend="localfs")
        yield Engine(handle.store, LocalLockManager(), {"localfs": fs}, settings)


async def body(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def read(engine: Engine, path: str) -> bytes:
    entry = await engine.find(path)
    assert entry is not None
    _, stream = await engine.open_file(Identity("alice"), entry)
    return b"".join([bytes(c) async for c in stream])


async def test_an_applied_exec_whose_reply_is_lost_counts_as_applied(
    engine: Engine, loss: ReplyLoss
) -> None:
    who = Identity("alice")
    path = CanonicalPath("/f.txt")
    await engine.put_file(who, path, body(b"old"))

    loss.arm()
    stored, created = await engine.put_file(who, path, body(b"new"))
    assert loss.fired == 1 and not created
    assert await read(engine, "/f.txt") == b"new"  # was: FileNotFound, the new blob reclaimed
    assert (await engine.find("/f.txt")) == stored

    loss.arm()
    await engine.create_file(who, CanonicalPath("/g.txt"), body(b"data"))  # was: 409
    assert await read(engine, "/g.txt") == b"data"

    loss.arm()
    await engine.delete(who, CanonicalPath("/g.txt"), recursive=False)  # was: 404
    assert await engine.find("/g.txt") is None


async def test_an_exec_lost_before_redis_ran_it_is_decided_again(
    engine: Engine, loss: ReplyLoss
) -> None:
    who = Identity("alice")
    path = CanonicalPath("/f.txt")
    await engine.put_file(who, path, body(b"old"))
    loss.arm(applied=False)
    await engine.put_file(who, path, body(b"new"))
    assert loss.fired == 1
    assert await read(engine, "/f.txt") == b"new"


async def test_the_engine_never_reclaims_the_blob_it_just_committed(
    engine: Engine, loss: ReplyLoss, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defence in depth: with the marker check taken away, the store decides the PUT again
    and reports its own entry as the replaced one; the engine must not reclaim that blob."""

    async def never(self: Any, name: Any) -> None:
        return None  # "no attempt applied"

    who = Identity("alice")
    path = CanonicalPath("/f.txt")
    await engine.put_file(who, path, body(b"old"))
    monkeypatch.setattr(redis_client.Pipeline, "get", never)
    loss.arm()
    await engine.put_file(who, path, body(b"new"))
    assert loss.fired == 1
    assert await read(engine, "/f.txt") == b"new"


async def test_a_fence_fails_an_exec_still_on_its_way(tmp_path: Path) -> None:
    """From a second review: redis-py also reports a late reply (a socket timeout while Redis
    stalls) as a WatchError, and the EXEC may then still be waiting in Redis. A retry that
    decided again and refused (409 over its own create) while that EXEC applied afterwards gave a
    wrong answer, and the engine dropped the bytes the EXEC then named. Retries now fence first:
    every attempt watches its marker, and the fence changes it, so the EXEC on its way fails."""
    async with make_metadata_store("redis", tmp_path) as handle:
        store = handle.store
        assert isinstance(store, RedisMetadataStore)
        marker = f"{store.p}applied:fence-test"
        late = store.r.pipeline(transaction=True)  # the first attempt, its EXEC not yet run
        await late.watch(marker)
        late.multi()
        late.set(marker, b"0")
        assert await store._fence(marker) is None  # nothing applied: fenced
        with pytest.raises(redis.exceptions.WatchError):
            await late.execute()  # the EXEC arriving after the fence does not apply
        await late.reset()
        assert await store.r.get(marker) == b"fenced"
        # and an attempt that did apply is named by the fence, which changes nothing
        await store.r.set(marker, b"3")
        assert await store._fence(marker) == 3
        await store.r.delete(marker)
