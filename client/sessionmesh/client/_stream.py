"""ChunkStream: one streamed tool call, with credit-based flow control and an input feed."""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterable, AsyncIterator, Generator
from typing import TYPE_CHECKING, Any

from sessionmesh import tracing
from sessionmesh.client._encode import encode_arguments, encode_input
from sessionmesh.core._deadline import bounded
from sessionmesh.core._tasks import Tasks
from sessionmesh.errors import MeshError, UsageError
from sessionmesh.v1 import session_service_pb2 as pb
from sessionmesh.wire.codec import from_value

log = logging.getLogger("sessionmesh.client")

if TYPE_CHECKING:
    from types import TracebackType

    from google.protobuf.struct_pb2 import Value

    from sessionmesh.client._proxy import BaseProxy
    from sessionmesh.client._transport import StreamCall

_INPUT_END = pb.StreamCallRequest(input_end=pb.InputEnd())

#: Chunks this client takes in one message: the agent sends those a tool yields while the
#: previous message is being written together (StreamStart.max_batch).
MAX_BATCH = 256


class ChunkStream:
    """The chunks of one streamed tool call, read with ``async for``.

    Leaving the loop early leaves the call running until ``aclose()`` or the end of an
    ``async with`` block; both cancel it, and the session stays usable.
    """

    __slots__ = (
        "_args",
        "_call",
        "_chunks",
        "_done",
        "_failure",
        "_feeder",
        "_given",
        "_input",
        "_messages",
        "_proxy",
        "_ready",
        "_session_id",
        "_span",
        "_tasks",
        "_tool",
        "_unacked",
        "_window",
        "_write_lock",
    )

    def __init__(
        self, proxy: BaseProxy, tool: str, args: dict[str, Any], session_id: str | None = None
    ) -> None:
        self._proxy = proxy
        self._tool = tool
        self._given = session_id  # an explicit session (None: the proxy's own)
        self._input: AsyncIterable[Any] | None = None
        for key, value in list(args.items()):
            if isinstance(value, AsyncIterable):
                if self._input is not None:
                    raise UsageError("a streamed call takes at most one async-iterable argument")
                self._input = value
                del args[key]
        self._args = args
        self._call: StreamCall | None = None
        self._messages: AsyncIterator[pb.StreamCallResponse] | None = None
        self._window = proxy.settings.buffer_size
        self._unacked = 0
        self._feeder: asyncio.Task[None] | None = None  # sends the input stream
        self._tasks = Tasks("a stream's input", log)
        self._write_lock = asyncio.Lock()
        self._done = False
        self._failure: MeshError | None = None  # an input item refused before sending
        self._session_id = ""
        self._span: Any = None  # the stream's span, when tracing is on
        self._chunks = 0
        #: The chunks of a batch not read yet.
        self._ready: collections.deque[Value] = collections.deque()

    def __aiter__(self) -> ChunkStream:
        return self

    def __await__(self) -> Generator[Any, None, Any]:
        raise UsageError(
            "this call streams: read it with `async for chunk in ...`; for one result, "
            "call a plain proxy (`await proxy(...)`, or proxy.options(streaming=False))"
        )

    def __iter__(self) -> ChunkStream:
        """``for chunk in ...``: in a plain ``def`` tool (a worker thread), where ``async
        for`` cannot run; each chunk is read on the proxy's event loop."""
        if asyncio._get_running_loop() is not None:
            raise UsageError("in async code, read the stream with `async for`")
        return self

    def __next__(self) -> Any:
        transport = self._proxy._transport
        try:
            return transport.blocking(self.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None

    async def __aenter__(self) -> ChunkStream:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def _open(self) -> StreamCall:
        proxy = self._proxy
        route = await proxy.route(self._given)
        endpoint, sid = route.endpoint, route.session_id
        start = pb.StreamCallRequest()
        start.start.window = self._window
        start.start.max_batch = MAX_BATCH
        start.start.call.tool = self._tool
        with route.settling():
            encode_arguments(start.start.call.arguments, self._args)
            headers = None
            tracer = tracing.tracer()
            if tracer is not None:
                self._span, headers = tracing.start_stream_span(tracer, self._tool, proxy.tool)
            # Inside a tool, the stream gets no more than what remains of the call it serves.
            timeout = bounded(proxy.settings.stream_timeout)
            call = endpoint.stream(sid, route.create, timeout, headers)
            self._call = call
            try:
                await call.open(start)
            except BaseException as exc:
                route.opened(call.session_id)  # refused after it opened: the id is known
                raise proxy.failed(sid, exc) from exc.__cause__
            route.opened(call.session_id)
        if not route.create and sid:
            proxy._transport.settle(sid, endpoint)
        self._messages = call.messages()
        if call.window is not None:
            self._window = min(self._window, call.window)
        self._session_id = sid or call.session_id or ""
        if self._input is not None:
            self._feeder = self._tasks.start(self._feed(call, self._input))
        else:
            await self._end_input(call)
        return call

    async def _end_input(self, call: StreamCall) -> None:
        # With a window the stream stays open for credit; otherwise half-close ends the input.
        if self._window:
            async with self._write_lock:
                await call.send(_INPUT_END)
        else:
            await call.done_writing()

    async def _feed(self, call: StreamCall, source: AsyncIterable[Any]) -> None:
        async for item in source:
            message = pb.StreamCallRequest()
            try:
                encode_input(message.input, item)
            except MeshError as refused:
                self._failure = refused  # __anext__ raises it: the call cannot go on
                call.cancel()
                return
            async with self._write_lock:
                if not await call.send(message):
                    return  # the call ended; __anext__ reports why
        await self._end_input(call)

    async def __anext__(self) -> Any:
        if self._done:
            raise StopAsyncIteration
        ready = self._ready
        value = ready.popleft() if ready else await self._receive()
        if self._window:
            self._unacked += 1
            if self._unacked * 2 >= self._window:
                credit, self._unacked = self._unacked, 0
                assert self._call is not None
                async with self._write_lock:
                    # The agent may have finished already; the next read tells how it ended.
                    await self._call.send(pb.StreamCallRequest(credit=credit))
        self._chunks += 1
        return from_value(value)

    async def _receive(self) -> Value:
        """The next message's first chunk (the rest of a batch waits in ``_ready``)."""
        call = self._call or await self._open()
        assert self._messages is not None
        try:
            message = await anext(self._messages)
        except StopAsyncIteration:
            self._finish()
            raise
        except BaseException as exc:
            if self._failure is not None:
                self._finish(self._failure)
                raise self._failure from None
            error = self._proxy.failed(self._session_id, call.failure(exc), self._tool)
            self._finish(error)
            if error is exc:
                raise
            raise error from exc
        kind = message.WhichOneof("kind")
        if kind == "chunks":
            values = message.chunks.values
            if values:
                self._ready.extend(values[1:])
                return values[0]
            return await self._receive()
        if kind == "end":
            # The tool is done. Half-close (the agent waits for it, so no credit we send
            # races the end), then read the status: EOF, or the error it ended with.
            self._window = 0
            async with self._write_lock:
                if self._feeder is not None:
                    self._feeder.cancel()
                await call.done_writing()
            return await self._receive()
        return message.chunk

    def _finish(self, error: BaseException | None = None) -> None:
        self._done = True
        if self._feeder is not None:
            self._feeder.cancel()
        if self._span is not None:
            span, self._span = self._span, None
            tracing.end_span(span, error, chunks=self._chunks)

    async def aclose(self) -> None:
        """Stop the stream; the tool is cancelled on the agent."""
        self._finish(None if self._done else asyncio.CancelledError())
        if self._call is not None:
            self._call.cancel()
        await self._tasks.aclose()

    def __del__(self) -> None:
        if self._call is not None:
            self._call.cancel()
