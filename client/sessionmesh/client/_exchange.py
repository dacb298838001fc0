"""Calls over one Exchange stream per endpoint: a message each way per call.

A message on an open stream costs about half a unary call, and the stream is shared by
every proxy on the connection, so even a session's first call rides it. Answers are
matched to calls by id; the agent keeps each session's calls in the order they were sent.
"""

from __future__ import annotations

import asyncio
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
from sessionmesh.wire.tasks import cancel_and_wait

#: Extra time the client waits past a call's own deadline (which the agent enforces).
_DEADLINE_SLACK = 1.0


def _expire(future: asyncio.Future[pb.ExchangeResponse], deadline: float) -> None:
    if not future.done():
        future.set_exception(CallTimeout(f"no answer within {deadline} s"))


class Exchange:
    __slots__ = ("_call", "_cancels", "_ids", "_lock", "_pending", "_reader", "broken")

    def __init__(self, stub: pb_grpc.SessionServiceAsyncStub) -> None:
        self._call: grpc.aio.StreamStreamCall[pb.ExchangeRequest, pb.ExchangeResponse] = (
            stub.Exchange()
        )
        self._pending: dict[int, asyncio.Future[pb.ExchangeResponse]] = {}
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()
        self.broken: RemoteError | None = None
        # Both kinds of task belong to this exchange: aclose() ends them.
        self._reader = asyncio.get_running_loop().create_task(self._read())
        self._cancels: set[asyncio.Task[None]] = set()

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
        # One write at a time. A write that fails keeps the lock until its caller knows why,
        # so that the calls queued behind it fail after it and after the calls already sent,
        # in the order they were made: retried elsewhere, a session's calls keep their order.
        async with self._lock:
            try:
                await self._call.write(message)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
                raise (await self._unsent(call_id, future)) from exc
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
                raise
            finally:
                timer.cancel()
        except asyncio.CancelledError:
            if self._pending.pop(call_id, None) is not None:
                # The caller is gone; tell the agent without making it wait for the write.
                task = asyncio.get_running_loop().create_task(self._cancel(call_id))
                self._cancels.add(task)
                task.add_done_callback(self._cancels.discard)
            raise

    async def _unsent(
        self, call_id: int, future: asyncio.Future[pb.ExchangeResponse]
    ) -> RemoteError:
        """Why a call's write failed. A write fails only on a broken stream, and grpc then
        reports a status it made up (INTERNAL): the reader's error, if it saw the break
        first, says more."""
        self._pending.pop(call_id, None)
        if not future.done():
            # The reader hears the status the agent ended the stream with (a refused
            # caller, say): wait for it briefly rather than guess.
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._reader), 1.0)
        if future.done() and not future.cancelled():
            error = future.exception()
            assert isinstance(error, RemoteError)
        else:
            future.cancel()
            error = self.broken or AgentUnavailable("the exchange stream to the agent broke")
            if self.broken is None:
                self.broken = error
        return error.copy()

    async def _cancel(self, call_id: int) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            async with self._lock:
                await self._call.write(pb.ExchangeRequest(id=call_id, cancel=True))

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
        """Half-close, let the agent answer what is in flight, then stop reading."""
        if self._cancels:  # cancellations are quick writes: let them go out first
            await asyncio.wait(list(self._cancels), timeout=1.0)
        if self.broken is None:
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                async with self._lock:
                    await self._call.done_writing()
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._reader), 5.0)
        await cancel_and_wait(self._reader, *self._cancels)
