"""Who owns a task, and how it ends: an owner for tasks that outlive their caller
(:class:`Tasks`), a race run in a task group (:func:`race`), a task that lives beside a
body (:func:`beside`), stopping a task that may be inside a grpc.aio call, waking the
tasks that wait for a shared writer.

grpc.aio can absorb a cancellation: a task cancelled while a call awaits its own start-up
task sees that inner task swallow the CancelledError and carries on as if nothing
happened (observed with Register and Watch streams). One ``task.cancel()`` is then lost,
and ``await task`` waits forever. :func:`cancel_and_wait` cancels until the task is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import anyio

T = TypeVar("T")

#: How long one cancellation gets to land before it is sent again.
_RETRY = 0.1


async def cancel_and_wait(*tasks: asyncio.Task[Any]) -> None:
    """Cancel ``tasks`` and return once all are done (their outcomes marked as seen). A
    cancellation of the caller itself still propagates."""
    pending = {t for t in tasks if not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=_RETRY)
    for task in tasks:
        if not task.cancelled():
            task.exception()  # seen: asyncio would log it when the task is collected


async def interrupt(
    task: asyncio.Task[Any], heard: Callable[[], bool], busy: Callable[[], bool]
) -> None:
    """Cancel ``task`` until it has ``heard`` (or ended): a handler's task inside a grpc.aio
    call can absorb one cancellation, and the interruption must not be lost. Never while it
    is ``busy`` (writing: a write cut halfway breaks the call, which then ends with no
    status at all); it is cancelled once it is not."""
    while not heard() and not task.done():
        if not busy():
            task.cancel()
        await asyncio.sleep(_RETRY)


def pulse(event: asyncio.Event) -> None:
    """Wake every task waiting on ``event`` now, and leave it unset: each checks again what
    it waits for and, if need be, waits for the next pulse. (One future shared by the
    waiters would be cancelled for all of them when one waiter is; a future per waiter kept
    in one slot wakes only the last.)"""
    event.set()
    event.clear()


class Tasks:
    """The tasks an object runs while it lives, with that object as their owner: each task
    started here is waited for when the owner closes (``aclose``: cancelled, then awaited
    until it has ended, grpc.aio or not), and its failure is seen, logged once under the
    owner's name, never lost in a task nobody awaits. For work that outlives the call that
    starts it (a watch, a lease, a reaper, a call that must finish after its caller left);
    work scoped to one call uses a task group."""

    __slots__ = ("_expected", "_log", "_owner", "_tasks")

    def __init__(
        self, owner: str, log: logging.Logger, expected: tuple[type[BaseException], ...] = ()
    ) -> None:
        self._owner = owner
        self._log = log
        #: Failures that are outcomes, seen by whoever awaits the task: not logged.
        self._expected = expected
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def start(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._ended)
        return task

    def _ended(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()  # seen, so asyncio does not log it again when collected
        if exc is not None and not isinstance(exc, self._expected):
            self._log.error("%s: a task failed: %r", self._owner, exc, exc_info=exc)

    async def wait(self) -> None:
        """Until every task started so far has ended by itself."""
        if self._tasks:
            await asyncio.wait(list(self._tasks))

    async def aclose(self) -> None:
        """Cancel every task and return once all have ended."""
        await cancel_and_wait(*self._tasks)


async def race(*waits: Callable[[], Awaitable[Any]]) -> dict[int, Any]:
    """Run ``waits`` side by side in a task group until one returns; the others are
    cancelled and awaited. What finished, by index: usually one, but two that finish in the
    same loop turn are both there (a queue's item is never dropped for a tie). One that
    raises ends the race too, and its exception is raised as it is."""
    done: dict[int, Any] = {}
    failure: Exception | None = None

    async def run(index: int, wait: Callable[[], Awaitable[Any]]) -> None:
        nonlocal failure
        try:
            done[index] = await wait()  # kept before any checkpoint: nothing can cut in
        except Exception as exc:
            failure = failure or exc
        group.cancel_scope.cancel()

    async with anyio.create_task_group() as group:
        for index, wait in enumerate(waits):
            group.start_soon(run, index, wait)
    if failure is not None:
        raise failure
    return done


@contextlib.asynccontextmanager
async def beside(coro: Coroutine[Any, Any, None]) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``coro`` in a task beside the body, for as long as the body runs: cancelled and
    awaited when the body ends, however it ends. The body's exception propagates as it
    is: a task group would wrap it in an ExceptionGroup, which grpc.aio does not expect
    from a handler (its abort is an exception). The task's failure is its own business:
    it reports through what it shares with the body."""
    task = asyncio.get_running_loop().create_task(coro)
    try:
        yield task
    finally:
        await cancel_and_wait(task)
