"""StreamCall plumbing: credit-based flow control, the input pump, the tool's input stream."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from sessionmesh.core._outbox import MAX_BATCH_BYTES
from sessionmesh.core._tasks import interrupt, pulse
from sessionmesh.server._eager import Eager
from sessionmesh.server._errors import Fail, invalid_arguments, invalid_stream
from sessionmesh.server._handlers import Undecodable
from sessionmesh.v1 import session_service_pb2 as pb
from sessionmesh.wire.codec import TooDeep, from_value, set_value

#: How long a finished flow-controlled stream waits for the client's half-close.
HALF_CLOSE_WAIT = 5.0

END_MESSAGE = pb.StreamCallResponse(end=pb.StreamEnd())

#: The most chunks in one message, whatever the client takes (StreamStart.max_batch).
MAX_BATCH = 1024


class Flow:
    """One StreamCall's client side: credit-based flow control (StreamStart.window), the
    tool's input stream, and a protocol error the pump found."""

    __slots__ = (
        "_receive",
        "_send",
        "allowed",
        "changed",
        "error",
        "error_heard",
        "finished",
        "max_batch",
        "sent",
        "window",
        "writing",
    )

    def __init__(self, window: int) -> None:
        self.window = window
        self.allowed = window
        self.sent = 0
        self.changed = asyncio.Event()
        self._send: MemoryObjectSendStream[Any] | None = None
        self._receive: MemoryObjectReceiveStream[Any] | None = None
        self.error: Fail | None = None
        self.error_heard = False  # the handler has turned the interruption into ``error``
        self.writing = False  # the handler's task is in a write: not to be cut there
        self.finished = False
        #: Chunks the client takes in one message (StreamStart.max_batch; 0 or 1: one).
        self.max_batch = 0

    def open_inputs(self, buffer_size: int) -> MemoryObjectReceiveStream[Any]:
        """The tool's input stream: items the client sends, at most ``buffer_size`` ahead of
        the tool; it ends at the client's input_end (or half-close)."""
        self._send, self._receive = anyio.create_memory_object_stream[Any](buffer_size)
        return self._receive

    def discard_inputs(self) -> None:
        """The tool is done: input the client still sends is dropped, and a pump waiting for
        room in the stream moves on."""
        if self._receive is not None:
            self._receive.close()

    async def refuse(self, error: Fail, main: asyncio.Task[Any]) -> None:
        """The client broke the protocol: stop the call (``main``, the handler) with
        ``error``, and make sure it hears it. A call already finished just fails."""
        self.error = error
        await interrupt(main, lambda: self.error_heard or self.finished, lambda: self.writing)

    def grant(self, n: int) -> None:
        self.allowed += n
        self.changed.set()

    async def credit(self) -> None:
        """Wait until the client has granted credit for one more chunk."""
        while self.sent >= self.allowed:
            self.changed.clear()
            await self.changed.wait()


async def pump(
    requests: AsyncIterator[pb.StreamCallRequest],
    flow: Flow,
    main: asyncio.Task[Any],
) -> None:
    """Read a StreamCall's later messages (input items and credit) until the half-close."""
    send = flow._send
    ended = False
    try:
        async for message in requests:
            if isinstance(message, Undecodable):
                await flow.refuse(message.fail(), main)
                return
            kind = message.WhichOneof("kind")
            if kind == "credit":
                flow.grant(message.credit)
            elif kind == "input" and send is not None and not ended:
                try:
                    item = from_value(message.input)
                except TooDeep as exc:
                    await flow.refuse(invalid_arguments(exc.path, f"input item {exc}"), main)
                    return
                # A tool that stopped reading its input drops the rest.
                with contextlib.suppress(anyio.BrokenResourceError):
                    await send.send(item)
            elif kind == "input_end":
                # Also how a flow-controlled client without input says so: not an error.
                ended = True
                if send is not None:
                    send.close()
            else:
                what = "a second 'start'" if kind == "start" else f"'{kind}'"
                if kind == "input" and send is None:
                    what = "'input', but this tool takes no input stream"
                elif kind == "input":
                    what = "'input' after 'input_end'"
                await flow.refuse(invalid_stream(f"unexpected StreamCall message: {what}"), main)
                return
    finally:
        if send is not None:
            send.close()  # a half-close ends the input too


class Batcher:
    """The chunks of a StreamCall whose client takes several per message (max_batch > 1).

    A chunk is written at once when nothing is being written; chunks the tool yields while
    a write is in flight wait for it and leave together in the next message. So a chunk
    never waits for others to join it, and a tool that yields faster than the wire drains
    pays for a message per batch, not per chunk. The tool waits only when a full batch is
    already waiting (max_batch chunks, or about MAX_BATCH_BYTES).
    """

    __slots__ = ("_bytes", "_max", "_next", "_room", "_values", "_write", "_writer", "error")

    def __init__(
        self, write: Callable[[pb.StreamCallResponse], Coroutine[Any, Any, None]], max_batch: int
    ) -> None:
        self._write = write
        self._max = min(max_batch, MAX_BATCH)
        self._next: pb.StreamCallResponse | None = None  # the batch being filled
        self._values: Any = None  # its chunks
        self._bytes = 0
        #: Finishes the write in progress, then writes the batch that filled meanwhile.
        self._writer: asyncio.Task[None] | None = None
        self._room = asyncio.Event()  # pulsed when the writer takes a batch, or stops
        #: Why a write failed; the stream cannot go on.
        self.error: BaseException | None = None

    async def add(self, item: object) -> None:
        """Send one chunk (NotJsonLike if it has no JSON form: nothing is sent)."""
        if self.error is not None:
            raise self.error
        if self._next is None:
            self._open()
        values = self._values
        value = values.add()
        try:
            set_value(value, item)
        except BaseException:
            del values[-1]
            raise
        size = value.ByteSize()
        if self._bytes + size > MAX_BATCH_BYTES and len(values) > 1:
            # It would make the waiting batch too big: it opens the next one.
            del values[-1]
            await self._full()
            self._open()
            set_value(self._values.add(), item)
        self._bytes += size
        if self._writer is None:
            self._start()
        elif len(self._values) >= self._max or self._bytes >= MAX_BATCH_BYTES:
            await self._full()

    def _open(self) -> None:
        self._next = pb.StreamCallResponse()
        self._values = self._next.chunks.values
        self._bytes = 0

    def _take(self) -> pb.StreamCallResponse:
        message, self._next, self._values = self._next, None, None
        assert message is not None
        pulse(self._room)
        return message

    def _start(self) -> None:
        # The write starts here, in the tool's task (no hop); the writer task sees it
        # complete, so that the tool runs on meanwhile.
        write = Eager(self._write(self._take()))
        if not write.done:
            # Bare, owned by this batcher: flush() awaits it before the stream ends. A
            # task per write in flight (not per chunk) is the price of the tool running on.
            self._writer = asyncio.get_running_loop().create_task(self._drain(write))

    async def _drain(self, first: Eager[None]) -> None:
        try:
            await first
            while self._next is not None:
                await self._write(self._take())
        except Exception as exc:
            self.error = exc
        finally:
            self._writer = None
            pulse(self._room)

    async def _full(self) -> None:
        """Wait until the writer takes the waiting batch."""
        while self._next is not None and self._writer is not None:
            await self._room.wait()
        if self.error is not None:
            raise self.error

    async def flush(self) -> None:
        """Wait until every chunk added is written, or a write failed (``error``)."""
        if self._writer is not None:
            await self._writer


class ChunkSink:
    """A StreamCall's chunks on their way to the client (the runner's ``Sink``): each waits
    for the client's credit when the stream is flow-controlled, and goes in a message of
    its own, or batched while a write is in flight when the client takes batches."""

    __slots__ = ("_batcher", "_flow", "_write")

    def __init__(
        self, write: Callable[[pb.StreamCallResponse], Coroutine[Any, Any, None]], flow: Flow
    ) -> None:
        self._write = write
        self._flow = flow
        self._batcher = Batcher(write, flow.max_batch) if flow.max_batch > 1 else None

    async def put(self, item: Any) -> None:
        flow = self._flow
        if flow.window:
            if flow.sent >= flow.allowed:
                await flow.credit()
            flow.sent += 1
        if self._batcher is not None:
            await self._batcher.add(item)
        else:
            message = pb.StreamCallResponse()
            set_value(message.chunk, item)
            flow.writing = True
            try:
                await self._write(message)
            finally:
                flow.writing = False

    async def flush(self) -> BaseException | None:
        batcher = self._batcher
        if batcher is None:
            return None
        await batcher.flush()
        return batcher.error
