"""Calls over one Exchange stream per endpoint: a message each way per call.

A message on an open stream costs about half a unary call, and the stream is shared by
every proxy on the connection, so even a session's first call rides it. Answers are
matched to calls by id; the agent keeps each session's calls in the order they were sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from typing import cast

import grpc

from sessionmesh.client._status import from_rpc_error
from sessionmesh.core._outbox import Outbox
from sessionmesh.core._tasks import Tasks
from sessionmesh.errors import (
    AgentUnavailable,
    CallTimeout,
    PermissionDenied,
    RemoteError,
    Unauthenticated,
)
from sessionmesh.v1 import session_service_pb2 as pb
from sessionmesh.v1 import session_service_pb2_grpc as pb_grpc
from sessionmesh.wire.keys import EXCHANGE_BATCH_KEY
from sessionmesh.wire.names import is_durable
from sessionmesh.wire.reasons import Reason

#: Extra time the client waits past a call's own deadline (which the agent enforces).
_DEADLINE_SLACK = 1.0


def _expire(future: asyncio.Future[pb.ExchangeResponse], deadline: float) -> None:
    if not future.done():
        future.set_exception(CallTimeout(f"no answer within {deadline} s"))


def _pack(messages: list[pb.ExchangeRequest]) -> pb.ExchangeRequest:
    # A new envelope: the callers' own messages stay as they are (a retry sends one again).
    envelope = pb.ExchangeRequest()
    envelope.CopyFrom(messages[0])
    envelope.more.extend(messages[1:])
    return envelope


#: Set in the metadata of an AgentUnavailable when the call surely never reached the agent
#: (it drained before reading it, or never answered at all): sending it elsewhere is safe.
UNDELIVERED = "undelivered"

log = logging.getLogger("sessionmesh.client")


class Exchange:
    __slots__ = (
        "_call",
        "_durable",
        "_ids",
        "_outbox",
        "_pending",
        "_reader",
        "_tasks",
        "broken",
    )

    def __init__(self, stub: pb_grpc.SessionServiceAsyncStub) -> None:
        # Answers may come several to a message; calls go so once the agent says it takes them.
        self._call: grpc.aio.StreamStreamCall[pb.ExchangeRequest, pb.ExchangeResponse] = (
            stub.Exchange(metadata=((EXCHANGE_BATCH_KEY, "1"),))
        )
        self._pending: dict[int, asyncio.Future[pb.ExchangeResponse]] = {}
        self._durable: set[int] = set()  # the calls in flight that are in durable sessions
        self._ids = itertools.count(1)
        self.broken: RemoteError | None = None
        # The reader, and the task looking into a failed write, belong to this exchange:
        # aclose() ends them.
        self._tasks = Tasks("an Exchange stream", log)
        # Callers never await a write: one cancelled halfway would end the shared stream.
        self._outbox: Outbox[pb.ExchangeRequest] = Outbox(
            self._call.write, self._unsent, self._tasks
        )
        self._reader = self._tasks.start(self._read())

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
        durable = is_durable(message.session_id)
        if durable:  # its owner may be declared unreachable meanwhile: abandon_durable()
            self._durable.add(call_id)
        try:
            future: asyncio.Future[pb.ExchangeResponse] = asyncio.get_running_loop().create_future()
            self._pending[call_id] = future
            outbox = self._outbox
            outbox.send(message)
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
                    outbox.unqueue(message)  # and one still queued is not sent
                    raise
                finally:
                    timer.cancel()
            except asyncio.CancelledError:
                if self._pending.pop(call_id, None) is not None and not outbox.unqueue(message):
                    # Sent: tell the agent, which may be running it.
                    outbox.send(pb.ExchangeRequest(id=call_id, cancel=True))
                raise
        finally:
            if durable:
                self._durable.discard(call_id)

    def abandon_durable(self, error: RemoteError) -> None:
        """The registry declared the agent unreachable: the calls of durable sessions still
        waiting here fail with ``error`` now, so that their proxies send them (with their
        call ids: never applied twice) to the replica that takes the session over, instead
        of waiting out their deadlines on a paused process. A late answer finds nobody."""
        for call_id in list(self._durable):
            future = self._pending.pop(call_id, None)
            if future is not None and not future.done():
                future.set_exception(error.copy())

    async def _unsent(self, _: BaseException) -> None:
        """A write failed. A write fails only on a broken stream, and grpc then reports a
        status it made up (INTERNAL): the reader hears the status the agent ended the stream
        with (a refused caller, say). Every call not answered fails with that, in the order
        the calls were made, so that retried elsewhere a session's calls keep it."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._reader), 1.0)
        if self.broken is None:
            self._fail(AgentUnavailable("the exchange stream to the agent broke"))

    async def _read(self) -> None:
        error: RemoteError
        pending = self._pending
        heard = False  # the agent's handler started (it sends its headers before reading)
        try:
            headers = await self._call.initial_metadata()
            heard = True
            if headers is not None and headers.get(EXCHANGE_BATCH_KEY) == "1":
                self._outbox.pack = _pack
            while True:
                answer = await self._call.read()
                if answer is grpc.aio.EOF:
                    # The agent drains: it answered every call it read, and read no more.
                    error = AgentUnavailable(
                        "the agent stopped: it ended the exchange stream before it read the call",
                        reason=Reason.SHUTTING_DOWN,
                        metadata={UNDELIVERED: "1"},
                    )
                    break
                answer = cast(pb.ExchangeResponse, answer)
                if answer.drained:  # the agent drains: what it did not answer, it never read
                    self._fail(
                        AgentUnavailable(
                            "the agent is stopping: it stopped reading before this call",
                            reason=Reason.SHUTTING_DOWN,
                            metadata={UNDELIVERED: "1"},
                        )
                    )
                    # Ended from here, so that no write of ours is left to fail on a
                    # stream the agent ended (a failed write tells nothing of the call).
                    self._call.cancel()
                    continue
                future = pending.pop(answer.id, None)
                if future is not None and not future.done():
                    future.set_result(answer)
                for more in answer.more:
                    future = pending.pop(more.id, None)
                    if future is not None and not future.done():
                        future.set_result(more)
        except grpc.aio.AioRpcError as exc:
            # The stream carries no call's own failure (those come in answers): whatever
            # ended it, the calls on it could not reach the agent, unless the agent refused
            # the caller itself (it says so to every call).
            error = from_rpc_error(exc)
            if not isinstance(error, AgentUnavailable | Unauthenticated | PermissionDenied):
                error = AgentUnavailable(f"the exchange stream to the agent broke: {error}")
            if not heard:  # it never started: no call on it reached the agent
                error.metadata[UNDELIVERED] = "1"
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
        outbox = self._outbox
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(outbox.flush(), 1.0)
        if self.broken is None and not outbox.busy:
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await self._call.done_writing()
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._reader), 5.0)
        await self._tasks.aclose()
