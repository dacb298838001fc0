"""Writing to a grpc.aio stream that several tasks share: one write at a time, and no
sender ever awaits one.

grpc.aio cancels a whole stream when a write is cancelled halfway, so a sender's own
cancellation must never reach a write. The first write on an idle stream starts in the
sender's task (``Eager``: no hop before the bytes leave); a writer task sees it complete,
then writes what was sent meanwhile, in order. When the peer takes several messages in one
(``pack``), everything waiting leaves in one write, up to ``max_count`` messages and about
``max_bytes``: under load a write costs once per batch, not once per message.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Generic, TypeVar

from google.protobuf.message import Message

from sessionmesh.wire.eager import Eager

M = TypeVar("M", bound=Message)

#: A batch closes at about this size: big messages travel alone.
MAX_BATCH_BYTES = 64 * 1024


class Outbox(Generic[M]):
    __slots__ = ("_on_error", "_queue", "_room", "_write", "_writer", "error", "max_count", "pack")

    def __init__(
        self,
        write: Callable[[M], Coroutine[Any, Any, None]],
        on_error: Callable[[BaseException], Awaitable[None]],
        max_count: int = 64,
    ) -> None:
        self._write = write
        self._on_error = on_error  # run in the writer task once a write failed
        self._queue: collections.deque[M] = collections.deque()
        self._writer: asyncio.Task[None] | None = None
        self._room: asyncio.Future[None] | None = None
        #: Several messages as one, when the peer takes batches; None: one at a time.
        self.pack: Callable[[list[M]], M] | None = None
        self.max_count = max_count
        #: Why a write failed: nothing more is written.
        self.error: BaseException | None = None

    @property
    def writer(self) -> asyncio.Task[None] | None:
        """The task finishing the write in flight, if one is."""
        return self._writer

    @property
    def queued(self) -> int:
        """Messages waiting for the write in flight."""
        return len(self._queue)

    def send(self, message: M) -> None:
        """Write ``message`` after those sent before it; never waits. After a failed write
        nothing more is written (``error``)."""
        if self._writer is not None:
            self._queue.append(message)
            return
        if self.error is not None:
            return
        loop = asyncio.get_running_loop()
        try:
            first = Eager(self._write(message))
        except Exception as exc:  # refused at once: the stream has ended
            self._writer = loop.create_task(self._drain(None, exc))
            return
        if not first.done:
            self._writer = loop.create_task(self._drain(first))

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
        while len(self._queue) >= limit and self._writer is not None:
            self._room = asyncio.get_running_loop().create_future()
            await self._room

    async def flush(self) -> None:
        """Wait until everything sent is written, or a write failed."""
        while self._writer is not None:
            await asyncio.shield(self._writer)

    async def _drain(self, first: Eager[None] | None, refused: Exception | None = None) -> None:
        try:
            if first is None:
                assert refused is not None
                raise refused
            await first
            queue = self._queue
            while queue:
                message = self._next()
                self._wake()
                await self._write(message)
        except Exception as exc:
            self.error = exc
            self._queue.clear()
            await self._on_error(exc)
        finally:
            self._writer = None
            if self.error is not None:
                self._queue.clear()  # sent while the failure was looked into: never written
            self._wake()

    def _next(self) -> M:
        queue = self._queue
        pack = self.pack
        if pack is None or len(queue) == 1:
            return queue.popleft()
        taken = take_batch(queue, self.max_count)
        return pack(taken) if len(taken) > 1 else taken[0]

    def _wake(self) -> None:
        room, self._room = self._room, None
        if room is not None and not room.done():
            room.set_result(None)


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
