"""``bounded``: ``await`` within a time limit, with no timer for a step that never suspends."""

from __future__ import annotations

import asyncio
import contextvars

import pytest

from callfs import concurrency
from callfs.concurrency import bounded

VAR: contextvars.ContextVar[str] = contextvars.ContextVar("VAR", default="unset")


async def test_a_step_that_never_suspends_arms_no_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_timer(*args: object) -> object:
        raise AssertionError("asyncio.timeout entered")

    async def inline() -> int:
        return 7

    monkeypatch.setattr(concurrency.asyncio, "timeout", no_timer)
    assert await bounded(inline(), 1.0) == 7

    async def fails() -> int:
        raise KeyError("inline")

    with pytest.raises(KeyError):
        await bounded(fails(), 1.0)


async def test_a_step_that_suspends_gives_its_result_its_error_and_sees_the_task() -> None:
    task = asyncio.current_task()
    VAR.set("caller")

    async def later() -> tuple[str, bool]:
        await asyncio.sleep(0)
        await asyncio.sleep(0.01)
        return VAR.get(), asyncio.current_task() is task

    assert await bounded(later(), 1.0) == ("caller", True)

    async def fails_later() -> None:
        await asyncio.sleep(0.01)
        raise KeyError("later")

    with pytest.raises(KeyError):
        await bounded(fails_later(), 1.0)


async def test_past_the_limit_the_step_is_cancelled_and_timeout_raised() -> None:
    seen: list[str] = []

    async def slow() -> None:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise
        finally:
            seen.append("finally")

    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        await bounded(slow(), 0.05)
    assert 0.04 < loop.time() - started < 1.0
    assert seen == ["cancelled", "finally"]
    assert not asyncio.current_task().cancelling()  # type: ignore[union-attr]


async def test_a_cancel_of_the_caller_reaches_the_step_and_is_not_a_timeout() -> None:
    seen: list[str] = []
    running = asyncio.Event()

    async def slow() -> None:
        running.set()
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    outer = asyncio.ensure_future(bounded(slow(), 10.0))
    await running.wait()
    outer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outer
    assert seen == ["cancelled"]


async def test_a_step_may_absorb_a_cancel_and_go_on() -> None:
    async def stubborn() -> str:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            await asyncio.sleep(0.01)  # still awaited through the wrapper after the throw
            return "absorbed"
        return "slept"

    outer = asyncio.ensure_future(bounded(stubborn(), 10.0))
    await asyncio.sleep(0.01)
    outer.cancel()
    assert await outer == "absorbed"


async def test_gather_all_stops_the_others_before_raising() -> None:
    from callfs.concurrency import gather_all

    ended: list[str] = []

    async def slow() -> int:
        try:
            await asyncio.sleep(5)
        finally:
            await asyncio.sleep(0.01)  # its cleanup takes a moment
            ended.append("slow")
        return 1

    async def fails() -> int:
        await asyncio.sleep(0.01)
        raise KeyError("one read failed")

    with pytest.raises(KeyError):
        await gather_all(slow(), fails())
    assert ended == ["slow"]  # ended before the error reached the caller
    assert await gather_all(asyncio.sleep(0, 1), asyncio.sleep(0.01, 2)) == [1, 2]
