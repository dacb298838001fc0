"""StreamCall plumbing: credit-based flow control, the input pump, the tool's input stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from sessionmesh.server._errors import Fail, invalid_stream
from sessionmesh.v1 import session_service_pb2 as pb
from sessionmesh.wire.codec import from_value

#: How long a finished flow-controlled stream waits for the client's half-close.
HALF_CLOSE_WAIT = 5.0

_END = object()
END_MESSAGE = pb.StreamCallResponse(end=pb.StreamEnd())


class Flow:
    """One StreamCall's client side: credit-based flow control (StreamStart.window), the
    tool's input queue, and a protocol error the pump found."""

    __slots__ = ("allowed", "changed", "error", "finished", "inputs", "sent", "window")

    def __init__(self, window: int) -> None:
        self.window = window
        self.allowed = window
        self.sent = 0
        self.changed = asyncio.Event()
        self.inputs: asyncio.Queue[Any] | None = None
        self.error: Fail | None = None
        self.finished = False

    def discard_inputs(self) -> None:
        """The tool is done: drop queued input so a pump blocked on a full queue moves on."""
        while self.inputs is not None and not self.inputs.empty():
            self.inputs.get_nowait()

    def grant(self, n: int) -> None:
        self.allowed += n
        self.changed.set()

    async def credit(self) -> None:
        """Wait until the client has granted credit for one more chunk."""
        while self.sent >= self.allowed:
            self.changed.clear()
            await self.changed.wait()


async def pump(
    requests: AsyncIterator[pb.StreamCallRequest], flow: Flow, main: asyncio.Task[Any]
) -> None:
    """Read a StreamCall's later messages (input items and credit) until the half-close."""
    ended = False
    inputs = flow.inputs
    async for message in requests:
        if flow.finished:
            continue  # the tool is done: read on to the half-close, ignoring the rest
        kind = message.WhichOneof("kind")
        if kind == "credit":
            flow.grant(message.credit)
        elif kind == "input" and inputs is not None and not ended:
            await inputs.put(from_value(message.input))
        elif kind == "input_end":
            if inputs is not None and not ended:
                ended = True
                await inputs.put(_END)
        else:
            what = "a second 'start'" if kind == "start" else f"'{kind}'"
            if kind == "input" and inputs is None:
                what = "'input', but this tool takes no input stream"
            elif kind == "input":
                what = "'input' after 'input_end'"
            flow.error = invalid_stream(f"unexpected StreamCall message: {what}")
            main.cancel()
            return
    if inputs is not None and not ended and not flow.finished:
        await inputs.put(_END)


async def drain(inputs: asyncio.Queue[Any]) -> AsyncIterator[Any]:
    while True:
        item = await inputs.get()
        if item is _END:
            return
        yield item
