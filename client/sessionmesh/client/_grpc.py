"""The client's one edge to gRPC: channels, stubs, and every RpcError mapped where it lands.

Nothing else in the client touches a stub or catches ``AioRpcError``; ``_exchange.py`` is
part of this edge (the shared Exchange stream behind :meth:`GrpcEndpoint.call`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import grpc
from google.protobuf.struct_pb2 import Value

from sessionmesh import tracing
from sessionmesh.client._exchange import Exchange
from sessionmesh.client._status import from_rpc_error
from sessionmesh.client._transport import Answer, Endpoint, StreamCall
from sessionmesh.core._credentials import PLAINTEXT, Credentials
from sessionmesh.core._reasons import from_status
from sessionmesh.errors import (
    AgentUnavailable,
    PermissionDenied,
    Unauthenticated,
    UsageError,
)
from sessionmesh.v1 import registry_service_pb2 as rpb
from sessionmesh.v1 import registry_service_pb2_grpc as rpb_grpc
from sessionmesh.v1 import session_service_pb2 as pb
from sessionmesh.v1 import session_service_pb2_grpc as pb_grpc
from sessionmesh.wire.keys import SESSION_CREATE_KEY, SESSION_ID_KEY, STREAM_WINDOW_KEY
from sessionmesh.wire.limits import (
    DEFAULT_MAX_CALLS_PER_STREAM,
    DEFAULT_MAX_MESSAGE_BYTES,
    channel_options,
)
from sessionmesh.wire.status import status_code

R = TypeVar("R")

Metadata = tuple[tuple[str, str], ...]
_CREATE: Metadata = ((SESSION_CREATE_KEY, "1"),)


def _headers(
    session_id: str, create: bool, extra: Mapping[str, str] | None = None
) -> Metadata | None:
    """The request headers that put a call in its session, or open one with it, and any
    ``extra`` the call carries (trace context)."""
    md = ((SESSION_ID_KEY, session_id),) if session_id else _CREATE if create else None
    if extra:
        return (*(md or ()), *extra.items())
    return md


def channel(
    address: str,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    options: Sequence[tuple[str, Any]] = (),
    credentials: Credentials = PLAINTEXT,
) -> grpc.aio.Channel:
    """A channel to an agent or registry."""
    return credentials.channel(
        address,
        [
            *channel_options(max_message_bytes),
            # Each client gets its own connection rather than one shared by every channel to
            # the same address, so independent clients do not contend for one connection.
            ("grpc.use_local_subchannel_pool", 1),
            *options,
        ],
    )


async def _unary(rpc: Callable[..., Awaitable[R]], request: Any, **kwargs: Any) -> R:
    try:
        return await rpc(request, **kwargs)
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc) from exc


def _session_id(headers: grpc.aio.Metadata | None) -> str:
    value = headers.get(SESSION_ID_KEY) if headers is not None else None
    return str(value) if value else ""


class GrpcEndpoint(Endpoint):
    """One agent instance behind one reused channel. Small calls share one long-lived
    Exchange stream (a message each way per call); big ones go as unary Calls."""

    __slots__ = ("_call_bytes", "_exchange", "_stub", "address", "channel", "instance_id")

    def __init__(
        self,
        address: str,
        *,
        instance_id: str = "",
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        options: Sequence[tuple[str, Any]] = (),
        credentials: Credentials = PLAINTEXT,
    ) -> None:
        self.address = address
        self.instance_id = instance_id
        self.channel = channel(address, max_message_bytes, options, credentials)
        #: StreamCalls not ended yet: closing ends them first (see aclose).
        self._streams: set[grpc.aio.StreamStreamCall[Any, Any]] = set()
        self._stub = pb_grpc.SessionServiceStub(self.channel)
        # Call, taking the request already encoded (a big call is encoded once, not twice).
        self._call_bytes: grpc.aio.UnaryUnaryMultiCallable[bytes, pb.CallResponse] = (
            self.channel.unary_unary(
                "/sessionmesh.v1.SessionService/Call",
                request_serializer=None,
                response_deserializer=pb.CallResponse.FromString,
            )
        )
        self._exchange: Exchange | None = None  # opened on first call, again after a break

    async def call(
        self, message: pb.ExchangeRequest, deadline: float | None, *, alone: bytes | None = None
    ) -> Answer:
        exchange = self._exchange
        if exchange is None or exchange.broken is not None:
            exchange = self._exchange = Exchange(self._stub)
        if alone is not None or exchange.in_flight >= DEFAULT_MAX_CALLS_PER_STREAM:
            # Too big, or the stream is full (the agent would refuse more): on its own.
            return await self._call_alone(message, alone, deadline)
        answer = await exchange.call(message, deadline)
        if answer.HasField("error"):
            e = answer.error
            failure = from_status(status_code(e.code), e.message, e.details)
            return Answer(answer.session_id, answer.result, failure)
        return Answer(answer.session_id, answer.result, None)

    async def _call_alone(
        self, message: pb.ExchangeRequest, encoded: bytes | None, deadline: float | None
    ) -> Answer:
        """A unary Call: a refusal (say, over the agent's size limit) then fails this call
        only, and it does not hold up the small calls behind it on the shared stream."""
        md = _headers(message.session_id, message.create_session, message.metadata)
        if encoded is None:
            encoded = message.call.SerializeToString()
        call = self._call_bytes(encoded, metadata=md, timeout=deadline)
        try:
            response = await call
        except grpc.aio.AioRpcError as exc:
            failure = from_rpc_error(exc)
            if isinstance(failure, AgentUnavailable):
                raise failure from exc
            return Answer(_session_id(exc.initial_metadata()), Value(), failure)
        return Answer(_session_id(await call.initial_metadata()), response.result, None)

    def stream(
        self,
        session_id: str,
        create: bool,
        deadline: float | None,
        headers: Mapping[str, str] | None = None,
    ) -> StreamCall:
        md = _headers(session_id, create, headers)
        call = self._stub.StreamCall(metadata=md, timeout=deadline)
        self._streams.add(call)
        call.add_done_callback(self._streams.discard)
        return GrpcStreamCall(call)

    def abandon_durable(self) -> None:
        """The registry declared this agent unreachable: calls of durable sessions waiting
        for it fail now, to be sent to the replica that takes their session over."""
        if self._exchange is not None:
            self._exchange.abandon_durable(
                AgentUnavailable(
                    f"the registry declared the agent at {self.address} unreachable; the "
                    "call goes to another replica, which takes its durable session over"
                )
            )

    async def create_session(self, tool: str, deadline: float | None) -> str:
        response = await _unary(
            self._stub.CreateSession, pb.CreateSessionRequest(tool=tool), timeout=deadline
        )
        return response.session.id

    async def close_session(self, session_id: str, deadline: float | None) -> bool:
        response = await _unary(
            self._stub.CloseSession,
            pb.CloseSessionRequest(session_id=session_id),
            timeout=deadline,
            metadata=tracing.headers() or None,
        )
        return response.closed

    async def list_tools(self, deadline: float | None) -> pb.ListToolsResponse:
        return await _unary(self._stub.ListTools, pb.ListToolsRequest(), timeout=deadline)

    async def list_sessions(self, deadline: float | None) -> pb.ListSessionsResponse:
        return await _unary(self._stub.ListSessions, pb.ListSessionsRequest(), timeout=deadline)

    async def accept_session(self, request: pb.AcceptSessionRequest, deadline: float) -> None:
        await _unary(self._stub.AcceptSession, request, timeout=deadline)

    async def move_sessions(
        self, request: pb.MoveSessionsRequest, deadline: float
    ) -> pb.MoveSessionsResponse:
        return await _unary(self._stub.MoveSessions, request, timeout=deadline)

    async def aclose(self) -> None:
        """Close the exchange stream gracefully; end the streams still open (cancelled: the
        agent cancels their tools) and wait until grpc is done with them; then close the
        channel. grpc delivers a call's last events on whichever loop polls next, so a
        channel closed under a live call can reach a loop that is closed by then."""
        if self._exchange is not None:
            await self._exchange.aclose()
        streams = list(self._streams)
        for call in streams:
            call.cancel()
        if streams:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_ended(streams), _STREAM_END_WAIT)
        await self.channel.close()


#: How long closing waits for grpc to finish the streams it cancelled.
_STREAM_END_WAIT = 2.0


async def _ended(calls: list[grpc.aio.StreamStreamCall[Any, Any]]) -> None:
    for call in calls:
        await call.code()  # cancelled: it ends at once, with no wait on the agent


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class GrpcStreamCall(StreamCall):
    __slots__ = ("_call", "_responses", "session_id", "window")

    def __init__(
        self, call: grpc.aio.StreamStreamCall[pb.StreamCallRequest, pb.StreamCallResponse]
    ) -> None:
        self._call = call
        self._responses: AsyncIterator[pb.StreamCallResponse] | None = None

    def _headers(self, headers: grpc.aio.Metadata | None) -> None:
        self.session_id = _session_id(headers) or None
        granted = headers.get(STREAM_WINDOW_KEY) if headers is not None else None
        self.window = int(granted) if granted else None

    async def open(self, start: pb.StreamCallRequest) -> None:
        call = self._call
        try:
            await call.write(start)
            # The headers bring the window the agent grants and, for a new session, its id.
            headers = await call.initial_metadata()
        except grpc.aio.AioRpcError as exc:
            self._headers(exc.initial_metadata())
            raise from_rpc_error(exc) from exc
        self._headers(headers)
        self._responses = aiter(call)  # grpc's own iterator: cheaper per message than read()

    async def send(self, message: pb.StreamCallRequest) -> bool:
        try:
            await self._call.write(message)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            return False  # the call ended; receive() says how
        return True

    async def done_writing(self) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await self._call.done_writing()

    def messages(self) -> AsyncIterator[pb.StreamCallResponse]:
        assert self._responses is not None, "open() first"
        return self._responses

    def failure(self, exc: BaseException) -> BaseException:
        if isinstance(exc, grpc.aio.AioRpcError):
            return from_rpc_error(exc)
        if isinstance(exc, asyncio.CancelledError) and not _cancelling():
            # grpc ends a call cancelled under its reader (the client closed its channel)
            # with CancelledError, in a task nobody cancelled: that task must not think so.
            return UsageError("this stream's client was closed while it was open; connect again")
        return exc

    def cancel(self) -> None:
        if not self._call.done():
            self._call.cancel()


class RegistryChannel:
    """The registry's Watch, as a client of the mesh reads it."""

    def __init__(self, address: str, credentials: Credentials = PLAINTEXT) -> None:
        self.address = address
        self._channel = channel(address, credentials=credentials)
        self._stub = rpb_grpc.RegistryServiceStub(self._channel)

    async def watch(self) -> AsyncIterator[rpb.WatchResponse]:
        """The registry's snapshot, then its changes; a broken watch raises AgentUnavailable."""
        try:
            async for message in self._stub.Watch(rpb.WatchRequest()):
                yield message
        except grpc.aio.AioRpcError as exc:
            error = from_rpc_error(exc)
            if isinstance(error, Unauthenticated | PermissionDenied):
                raise error from exc  # it answered: it will not serve this caller
            raise AgentUnavailable(
                f"the registry at {self.address} is unreachable ({exc.code().name}: "
                f"{exc.details()})",
                code=error.code,
            ) from exc

    async def aclose(self) -> None:
        await self._channel.close()
