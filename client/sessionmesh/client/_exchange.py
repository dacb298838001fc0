"""Calls over one Exchange stream per endpoint: a message each way per call.

A message on an open stream costs about half a unary call, and the stream is shared by
every proxy on the connection, so even a session's first call rides it. Answers are
matched to calls by id; the agent keeps each session's calls in the order they were sent.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
from typing import cast

import grpc

from sessionmesh.client._status import from_rpc_error
from sessionmesh.client.errors import (
    AgentUnavailable,
    CallTimeout,
    PermissionDenied,
    RemoteError,
    Unauthenticated,
)
from sessionmesh.v1 import session_service_pb2 as pb
from sessionmesh.v1 import session_service_pb2_grpc as pb_grpc
from sessionmesh.wire.eager import Eager
from sessionmesh.wire.tasks import cancel_and_wait

#: Extra time the client waits past a call's own deadline (which the agent enforces).
_DEADLINE_SLACK = 1.0


def _expire(future: asyncio.Future[pb.ExchangeResponse], deadline: float) -> None:
    if not future.done():
        future.set_exception(CallTimeout(f"no answer within {deadline} s"))


class Exchange:
    __slots__ = ("_call", "_ids", "_outbox", "_pending", "_reader", "_writer", "broken")

    def __init__(self, stub: pb_grpc.SessionServiceAsyncStub) -> None:
        self._call: grpc.aio.StreamStreamCall[pb.ExchangeRequest, pb.ExchangeResponse] = (
            stub.Exchange()
        )
        self._pending: dict[int, asyncio.Future[pb.ExchangeResponse]] = {}
        self._ids = itertools.count(1)
        self.broken: RemoteError | None = None
        # Both tasks belong to this exchange: aclose() ends them.
        self._reader = asyncio.get_running_loop().create_task(self._read())
        #: Finishes the write in progress, then writes what queued behind it, in order.
        self._writer: asyncio.Task[None] | None = None
        self._outbox: collections.deque[pb.ExchangeRequest] = collections.deque()

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    async def call(
        self, message: pb.ExchangeRequest, deadline: float | None
    ) -> pb.ExchangeResponse:
        """Send one call and wait for its answer. Transport failures raise; a failed call
        comes back as an answer with ``error`` set."""
        if self.broken is not None:
            raise self.broken.copy()
        call_id = message.id = next(self._ids)
        future: asyncio.Future[pb.ExchangeResponse] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        self._send(message)
        try:
            if deadline is None:
                return await future
            # A timer on the future itself: asyncio.wait_for costs a wrapper and callbacks.
            timer = asyncio.get_running_loop().call_later(
                deadline + _DEADLINE_SLACK, _expire, future, deadline
            )
            try:
                return await future
            except CallTimeout:
                self._pending.pop(call_id, None)  # an answer after this finds nobody
                self._unqueue(message)  # and one still queued is not sent
                raise
            finally:
                timer.cancel()
        except asyncio.CancelledError:
            if self._pending.pop(call_id, None) is not None and not self._unqueue(message):
                # Sent: tell the agent, which may be running it.
                self._send(pb.ExchangeRequest(id=call_id, cancel=True))
            raise

    def _send(self, message: pb.ExchangeRequest) -> None:
        """Write ``message`` after those sent before it; never waits. The caller awaits its
        answer, not the write: a write cancelled halfway cancels the whole stream in
        grpc.aio, so no caller's cancellation may reach one. The first write on an idle
        stream starts here and now (no hop); the writer task sees it complete."""
        if self._writer is not None:
            self._outbox.append(message)
            return
        first: Eager[None] | None
        try:
            first = Eager(self._call.write(message))
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            first = None  # the stream has ended: the writer finds out how
        else:
            if first.done:
                return
        self._writer = asyncio.get_running_loop().create_task(self._write(first))

    def _unqueue(self, message: pb.ExchangeRequest) -> bool:
        """Take back a message not written yet; False if it was (or is being) written."""
        outbox = self._outbox
        for i, queued in enumerate(outbox):
            if queued is message:
                del outbox[i]
                return True
        return False

    async def _write(self, first: Eager[None] | None) -> None:
        try:
            if first is None:
                raise asyncio.InvalidStateError
            await first
            outbox = self._outbox
            while outbox:
                await self._call.write(outbox.popleft())
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            # A write fails only on a broken stream, and grpc then reports a status it made
            # up (INTERNAL): the reader hears the status the agent ended the stream with (a
            # refused caller, say). Every call not answered fails with that, in the order
            # the calls were made, so that retried elsewhere a session's calls keep it.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._reader), 1.0)
            if self.broken is None:
                self._fail(AgentUnavailable("the exchange stream to the agent broke"))
        finally:
            self._writer = None
            if self.broken is not None:
                self._outbox.clear()  # their calls have failed

    async def _read(self) -> None:
        error: RemoteError
        try:
            while True:
                answer = await self._call.read()
                if answer is grpc.aio.EOF:
                    error = AgentUnavailable("the agent ended the exchange stream")
                    break
                answer = cast(pb.ExchangeResponse, answer)
                future = self._pending.pop(answer.id, None)
                if future is not None and not future.done():
                    future.set_result(answer)
        except grpc.aio.AioRpcError as exc:
            # The stream carries no call's own failure (those come in answers): whatever
            # ended it, the calls on it could not reach the agent, unless the agent refused
            # the caller itself (it says so to every call).
            error = from_rpc_error(exc)
            if not isinstance(error, AgentUnavailable | Unauthenticated | PermissionDenied):
                error = AgentUnavailable(f"the exchange stream to the agent broke: {error}")
        except asyncio.CancelledError:
            self._fail(AgentUnavailable("the exchange stream was closed"))
            raise
        self._fail(error)

    def _fail(self, error: RemoteError) -> None:
        self.broken = error
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(error.copy())

    async def aclose(self) -> None:
        """Half-close once what is queued is written (cancellations included), let the agent
        answer what is in flight, then stop reading."""
        if self._writer is not None:
            await asyncio.wait([self._writer], timeout=1.0)
        if self.broken is None and self._writer is None:
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await self._call.done_writing()
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._reader), 5.0)
        await cancel_and_wait(self._reader, *([self._writer] if self._writer else []))
