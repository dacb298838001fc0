"""Run a coroutine's first step at once, in the current task, and the rest (if any) later in
that same task.

Most tool calls never wait: their first step is all of them. Starting each in a task of its
own costs a task and a loop turn per call; Python 3.12's eager tasks remove that, 3.11 has
none. Running the first step by hand in the current task is only sound if everything the
coroutine captures there (``asyncio.current_task()``: a session's turn, ``asyncio.timeout``,
a task group) stays true, so the rule is: a coroutine that waits is awaited to its end in
the task that ran its first step. Each runs in a copy of the context, as in a task of its
own: what one call sets in a context variable never leaks into the next.

A coroutine that captures nothing of its task may be finished by another: a StreamCall's
write starts in the tool's task (no hop before the bytes leave) and a writer task awaits
its completion while the tool runs on (server/_streaming.py).
"""

from __future__ import annotations

import contextvars
from collections.abc import Coroutine, Generator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Eager(Generic[T]):
    """``Eager(coro)`` runs the first step; ``done`` says whether that was all (then
    ``result`` holds its value; an exception it raised has propagated). Otherwise ``await``
    it, from the same task, for the rest."""

    __slots__ = ("_context", "_coro", "_pending", "done", "result")

    def __init__(self, coro: Coroutine[Any, Any, T]) -> None:
        self._coro = coro
        self._context = contextvars.copy_context()
        self.done = False
        try:
            self._pending = self._context.run(coro.send, None)
        except StopIteration as stop:
            self.done = True
            self.result: T = stop.value

    def __await__(self) -> Generator[Any, Any, T]:
        # What a Task does with a coroutine, step by step: hand what it waits on to the
        # awaiting task, and pass back the wake-up value or the exception (a cancellation).
        coro, run = self._coro, self._context.run
        pending = self._pending
        while True:
            try:
                sent = yield pending
            except BaseException as exc:  # thrown in by the task: a cancellation, say
                try:
                    pending = run(coro.throw, exc)
                except StopIteration as stop:
                    result: T = stop.value
                    return result
            else:
                try:
                    pending = run(coro.send, sent)
                except StopIteration as stop:
                    result = stop.value
                    return result
