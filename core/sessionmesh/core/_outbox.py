"""Writing to a grpc.aio stream that several tasks share: one write at a time, and no
sender ever awaits one.

grpc.aio cancels a whole stream when a write is cancelled halfway, so a sender's own
cancellation must never reach a write. A write starts in the sender's task, at once when
nothing else is being written (no hop before the bytes leave), and no task awaits it: the
outbox steps the write's coroutine from the completion callbacks of what it waits on, as a
Task would, without a Task per write (one per call is measurable here). What was sent
meanwhile follows, in order. When the peer takes several messages in one (``pack``),
everything waiting leaves in one write, up to ``max_count`` messages and about
MAX_BATCH_BYTES: under load a write costs once per batch, not once per message.
"""

from __future__ import annotations

import asyncio
import collections
import functools
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Generic, TypeVar

from google.protobuf.message import Message

from sessionmesh.core._tasks import Tasks, pulse

M = TypeVar("M", bound=Message)

#: A batch closes at about this size: big messages travel alone.
MAX_BATCH_BYTES = 64 * 1024


class Outbox(Generic[M]):
    __slots__ = (
        "_busy",
        "_changed",
        "_on_error",
        "_queue",
        "_tasks",
        "_write",
        "error",
        "max_count",
        "pack",
    )

    def __init__(
        self,
        write: Callable[[M], Coroutine[Any, Any, None]],
        on_error: Callable[[BaseException], Awaitable[None]],
        tasks: Tasks,
        max_count: int = 64,
    ) -> None:
        self._write = write
        self._on_error = on_error  # awaited in a task of ``tasks`` once a write failed
        self._tasks = tasks
        self._queue: collections.deque[M] = collections.deque()
        self._busy = False  # a write is in flight
        self._changed = asyncio.Event()  # pulsed at each step: what waiters wait for moved
        #: Several messages as one, when the peer takes batches; None: one at a time.
        self.pack: Callable[[list[M]], M] | None = None
        self.max_count = max_count
        #: Why a write failed: nothing more is written.
        self.error: BaseException | None = None

    @property
    def busy(self) -> bool:
        """A write is in flight (or a failed one is being looked into)."""
        return self._busy

    @property
    def queued(self) -> int:
        """Messages waiting for the write in flight."""
        return len(self._queue)

    def send(self, message: M) -> None:
        """Write ``message`` after those sent before it; never waits. After a failed write
        nothing more is written (``error``)."""
        if self._busy:
            self._queue.append(message)
        elif self.error is None:
            self._busy = True
            self._step(self._write(message), None)

    def unqueue(self, message: M) -> bool:
        """Take back a message not written yet; False if it was (or is being) written."""
        queue = self._queue
        for i, queued in enumerate(queue):
            if queued is message:
                del queue[i]
                return True
        return False

    async def room(self, limit: int) -> None:
        """Wait until fewer than ``limit`` messages wait (a bound on what piles up)."""
        while len(self._queue) >= limit and self._busy:
            await self._changed.wait()

    async def flush(self) -> None:
        """Wait until everything sent is written, or a failed write has been looked into."""
        while self._busy:
            await self._changed.wait()

    def _step(self, write: Coroutine[Any, Any, None], _: object) -> None:
        """Run the write on to its next wait, as a Task would after a wake-up."""
        while True:
            try:
                waits_on = write.send(None)
            except StopIteration:
                if not self._queue:
                    self._busy = False
                    pulse(self._changed)
                    return
                write = self._write(self._next())  # the next write starts right away
                pulse(self._changed)
                continue
            except (Exception, asyncio.CancelledError) as exc:  # the stream ended under it
                self._failed(exc)
                return
            if waits_on is None:  # a bare yield: go on in the next loop turn
                asyncio.get_running_loop().call_soon(self._step, write, None)
            else:
                waits_on._asyncio_future_blocking = False
                waits_on.add_done_callback(functools.partial(self._step, write))
            return

    def _failed(self, exc: BaseException) -> None:
        self.error = exc
        self._queue.clear()
        self._tasks.start(self._look_into(exc))

    async def _look_into(self, exc: BaseException) -> None:
        try:
            await self._on_error(exc)
        finally:
            self._queue.clear()  # sent while the failure was looked into: never written
            self._busy = False
            pulse(self._changed)

    def _next(self) -> M:
        queue = self._queue
        pack = self.pack
        if pack is None or len(queue) == 1:
            return queue.popleft()
        taken = take_batch(queue, self.max_count)
        return pack(taken) if len(taken) > 1 else taken[0]


def take_batch(queue: collections.deque[M], max_count: int) -> list[M]:
    """The first messages of ``queue`` (at least one), up to ``max_count`` and about
    MAX_BATCH_BYTES, taken off it."""
    first = queue.popleft()
    taken = [first]
    size = first.ByteSize()
    while queue and len(taken) < max_count:
        more = queue[0].ByteSize()
        if size + more > MAX_BATCH_BYTES:
            break
        taken.append(queue.popleft())
        size += more
    return taken
