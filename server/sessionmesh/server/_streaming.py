"""StreamCall plumbing: credit-based flow control, the input pump, the tool's input stream."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from sessionmesh.server._errors import Fail, invalid_stream
from sessionmesh.server._handlers import Undecodable
from sessionmesh.v1 import session_service_pb2 as pb
from sessionmesh.wire.codec import from_value

#: How long a finished flow-controlled stream waits for the client's half-close.
HALF_CLOSE_WAIT = 5.0

END_MESSAGE = pb.StreamCallResponse(end=pb.StreamEnd())


class Flow:
    """One StreamCall's client side: credit-based flow control (StreamStart.window), the
    tool's input stream, and a protocol error the pump found."""

    __slots__ = ("_receive", "_send", "allowed", "changed", "error", "finished", "sent", "window")

    def __init__(self, window: int) -> None:
        self.window = window
        self.allowed = window
        self.sent = 0
        self.changed = asyncio.Event()
        self._send: MemoryObjectSendStream[Any] | None = None
        self._receive: MemoryObjectReceiveStream[Any] | None = None
        self.error: Fail | None = None
        self.finished = False

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
                flow.error = message.fail()
                main.cancel()
                return
            if flow.finished:
                continue  # the tool is done: read on to the half-close, ignoring the rest
            kind = message.WhichOneof("kind")
            if kind == "credit":
                flow.grant(message.credit)
            elif kind == "input" and send is not None and not ended:
                # A tool that stopped reading its input drops the rest.
                with contextlib.suppress(anyio.BrokenResourceError):
                    await send.send(from_value(message.input))
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
                flow.error = invalid_stream(f"unexpected StreamCall message: {what}")
                main.cancel()
                return
    finally:
        if send is not None:
            send.close()  # a half-close ends the input too
