"""Hops off the event loop: blocking I/O to a thread pool, CPU work to a CPU pool; and handing
items to a consumer task through a bounded queue."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import os
from collections.abc import Awaitable, Callable, Coroutine, Generator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, ParamSpec, TypeVar, cast

P = ParamSpec("P")
T = TypeVar("T")

_io_pool: ThreadPoolExecutor | None = None
_cpu_pool: ThreadPoolExecutor | None = None


def _pools() -> tuple[ThreadPoolExecutor, ThreadPoolExecutor]:
    global _io_pool, _cpu_pool
    if _io_pool is None:
        _io_pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="callfs-io")
    if _cpu_pool is None:
        _cpu_pool = ThreadPoolExecutor(
            max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="callfs-cpu"
        )
    return _io_pool, _cpu_pool


async def run_blocking(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run a blocking call (disk, sqlite3, boto3) on the I/O pool; context vars carry over."""
    loop = asyncio.get_running_loop()
    ctx = contextvars.copy_context()
    call = functools.partial(ctx.run, fn, *args, **kwargs)
    return await loop.run_in_executor(_pools()[0], call)


async def to_end(step: Awaitable[T], abandoned: Callable[[T], object] | None = None) -> T:
    """Await ``step`` (as a task) so that a cancel of the caller does not stop it: the cancel
    waits until ``step`` has ended, then propagates; a result it still produced goes to
    ``abandoned`` (a descriptor it opened, to close), or is dropped. For a step whose caller
    cleans up after it: the cleanup then sees everything the step did (a file it created, a
    rename it made) and never closes a descriptor the step is still writing to (whose number
    another open could take before the step's next write reaches the kernel)."""
    task = asyncio.ensure_future(step)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        while not task.done():
            with contextlib.suppress(asyncio.CancelledError):  # cancelled again: still wait
                await asyncio.wait({task})
        if not task.cancelled() and task.exception() is None and abandoned is not None:
            with contextlib.suppress(OSError):  # the caller's cancel is what propagates
                abandoned(task.result())
        raise


async def run_to_end(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """``run_blocking`` through ``to_end``: a cancel waits for the call to end in its thread."""
    return await to_end(run_blocking(fn, *args, **kwargs))


async def run_cpu(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run CPU-bound work that releases the GIL (zfec, hashing) on the CPU pool."""
    loop = asyncio.get_running_loop()
    call = functools.partial(fn, *args, **kwargs)
    return await loop.run_in_executor(_pools()[1], call)


def retrieved(future: asyncio.Future[Any]) -> None:
    """A done callback for a future whose outcome nobody may await any more (its askers gave
    up): marks an exception as seen, so asyncio does not log "exception was never retrieved"."""
    if not future.cancelled():
        future.exception()


def shutdown_pools() -> None:
    global _io_pool, _cpu_pool
    for pool in (_io_pool, _cpu_pool):
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
    _io_pool = _cpu_pool = None


async def bounded(step: Coroutine[Any, Any, T], seconds: float) -> T:
    """``await step`` within ``seconds`` (``TimeoutError`` after, like ``asyncio.timeout``),
    arming the timer only if ``step`` suspends. A timeout can only fire at a suspension point
    anyway; entering and leaving ``asyncio.timeout`` costs 4.4 us, about 4 % of a GET 4 KiB whose
    inline metadata read and file open each passed one without ever suspending. The first step
    runs here, in the caller's task, as ``await step`` would run it."""
    try:
        first = step.send(None)
    except StopIteration as done:
        return cast(T, done.value)
    async with asyncio.timeout(seconds):
        return await _Resumed(step, first)


class _Resumed(Generic[T]):
    """Awaits the rest of a coroutine whose first step already ran and yielded ``first``: what
    ``await`` does from there on (PEP 380), the yielded futures passed to the task and its
    results, exceptions (a cancel) and close passed back."""

    def __init__(self, step: Coroutine[Any, Any, T], first: Any) -> None:
        self._step = step
        self._first = first

    def __await__(self) -> Generator[Any, Any, T]:
        step, out = self._step, self._first
        while True:
            try:
                sent = yield out
            except GeneratorExit:
                step.close()
                raise
            except BaseException as exc:  # thrown in by the task: a cancel, above all
                try:
                    out = step.throw(exc)
                except StopIteration as done:
                    return cast(T, done.value)
            else:
                try:
                    out = step.send(sent)
                except StopIteration as done:
                    return cast(T, done.value)


async def gather_all(*steps: Awaitable[T]) -> list[T]:
    """``asyncio.gather`` of ``steps`` that, when one fails (or the caller is cancelled), cancels
    the others and waits for them to end before raising: nothing still runs when the caller
    cleans up after them (closes the streams they read)."""
    tasks = [asyncio.ensure_future(step) for step in steps]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def put_unless_done(queue: asyncio.Queue[T], item: T, consumer: asyncio.Future[Any]) -> bool:
    """Put ``item`` into the bounded ``queue`` that ``consumer`` drains; False, without putting
    it, once ``consumer`` has ended (failed or returned) instead of waiting for room forever."""
    if consumer.done():
        return False
    put = asyncio.ensure_future(queue.put(item))
    pending: set[asyncio.Future[Any]] = {put, consumer}
    done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
    if put in done:
        return True
    put.cancel()
    return False
