"""Proxies: call an agent's tools, with sessions managed for you."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import secrets
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any, Final

import grpc
from google.protobuf.struct_pb2 import Value

from sessionmesh.client._codec import NotJsonLike, from_value, set_struct, set_value
from sessionmesh.client._exchange import exchange_for
from sessionmesh.client._wire import (
    SESSION_CREATE_KEY,
    SESSION_ID_KEY,
    STREAM_WINDOW_KEY,
    Reason,
)
from sessionmesh.client.errors import (
    AgentUnavailable,
    RemoteError,
    SessionLost,
    SessionOwnerLost,
    SessionOwnerUnavailable,
    UsageError,
    map_rpc_error,
    map_status,
    status_code,
)
from sessionmesh.v1 import session_service_pb2 as pb

if TYPE_CHECKING:
    from types import TracebackType

    from sessionmesh.client._transport import Endpoint, Transport

log = logging.getLogger("sessionmesh.proxy")

Metadata = tuple[tuple[str, str], ...]
_CREATE: Final[Metadata] = ((SESSION_CREATE_KEY, "1"),)
#: Calls bigger than this (encoded) skip the shared Exchange stream: see _call_alone.
EXCHANGE_MAX_BYTES = 64 * 1024


@dataclasses.dataclass(frozen=True, slots=True)
class ProxyOptions:
    """How a proxy calls. Every field has an effect; see ``Proxy``."""

    session_required: bool = False
    stateful: bool = False
    auto_session_management: bool = True
    timeout: float | None = None
    retry_count: int = 0
    retry_delay: float = 0.5
    streaming: bool = False
    stream_timeout: float | None = None
    buffer_size: int = 64

    def __post_init__(self) -> None:
        if self.retry_count < 0:
            raise UsageError("retry_count must be >= 0")
        if self.retry_delay < 0:
            raise UsageError("retry_delay must be >= 0 seconds")
        if self.buffer_size < 1:
            raise UsageError("buffer_size must be >= 1 (chunks in flight)")
        for name in ("timeout", "stream_timeout"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UsageError(f"{name} must be > 0 seconds, or None")

    @property
    def auto_session(self) -> bool:
        return self.session_required and self.auto_session_management

    def replace(self, **changes: Any) -> ProxyOptions:
        """These options with ``changes``; an unknown name is a UsageError."""
        try:
            return dataclasses.replace(self, **changes)
        except TypeError as exc:
            raise UsageError(f"unknown proxy option: {exc}") from None


class _Binding:
    """The auto session shared by a proxy and its ``.options()`` copies."""

    __slots__ = (
        "_ids",
        "creating",
        "endpoint",
        "lost",
        "metadata",
        "prefix",
        "reused",
        "session_id",
    )

    def __init__(self) -> None:
        self.session_id: str | None = None
        self.metadata: Metadata | None = None
        self.endpoint: Endpoint | None = None
        self.lost: SessionLost | None = None
        self.reused = False
        self.creating: asyncio.Event | None = None
        self.prefix = secrets.token_hex(12) + "-"
        self._ids = itertools.count(1)

    def next_call_id(self) -> str:
        return f"{self.prefix}{next(self._ids)}"

    def established(self, endpoint: Endpoint, session_id: str | None) -> None:
        """The call that was opening the session ended: with its id, or without (failed)."""
        if session_id and self.session_id is None:
            self.session_id = str(session_id)
            self.metadata = ((SESSION_ID_KEY, self.session_id),)
            self.endpoint = endpoint
            log.info("auto session %s opened on %s", self.session_id[:14], endpoint.address)
        event, self.creating = self.creating, None
        if event is not None:
            event.set()

    def reset(self) -> None:
        self.session_id = self.metadata = self.endpoint = self.lost = None
        self.reused = False


def _split_call(
    tool: str, call: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    if not call:
        return tool, kwargs
    if not isinstance(call[0], str) or len(call) > 2:
        raise UsageError(
            "call a proxy as proxy(**kwargs), proxy('tool', {args}) or proxy('tool', **kwargs)"
        )
    args = dict(call[1]) if len(call) == 2 and call[1] else {}
    args.update(kwargs)
    return call[0], args


class Proxy:
    """Calls one tool of an agent (and, by name, its other tools), inside a session if asked.

    With ``session_required=True`` (and ``auto_session_management``, the default) the first
    call opens a session, later calls reuse it on the instance that owns it, and
    ``cleanup_auto_session()`` or leaving ``async with proxy:`` closes it. A call that finds
    the session gone raises :class:`~sessionmesh.client.errors.SessionLost`; the proxy then
    refuses further calls until it is cleaned up, so state is never silently reset.

    Example::

        async with mesh.connect("127.0.0.1:50051") as agent:
            async with agent.proxy("session_counter", session_required=True) as counter:
                assert [await counter(increment=n) for n in (1, 2, 3)] == [1, 3, 6]

    Options: ``timeout`` is each call's deadline; ``retry_count``/``retry_delay`` retry a call
    that could not reach the agent (each call carries an id, so a retry never runs a tool
    twice); ``stream_timeout`` bounds a whole stream; ``buffer_size`` is how many chunks a
    stream may have in flight before a slow reader holds the tool back; ``stateful`` pins
    every call to one instance even without a session; ``streaming`` makes ``proxy(...)``
    return a chunk stream instead of a result.
    """

    __slots__ = ("_binding", "_opts", "_tool", "_transport")

    def __init__(
        self,
        transport: Transport,
        tool: str,
        opts: ProxyOptions | None = None,
        *,
        _binding: _Binding | None = None,
    ) -> None:
        self._transport = transport
        self._tool = tool
        self._opts = opts or ProxyOptions()
        self._binding = _binding or _Binding()

    def __repr__(self) -> str:
        sid = self._binding.session_id
        return f"<Proxy {self._tool!r}{' session ' + sid[:14] if sid else ''}>"

    # -- settings -----------------------------------------------------------------------------

    @property
    def tool(self) -> str:
        return self._tool

    @property
    def settings(self) -> ProxyOptions:
        return self._opts

    @property
    def session_required(self) -> bool:
        return self._opts.session_required

    @property
    def auto_session_management(self) -> bool:
        return self._opts.auto_session_management

    @property
    def session_id(self) -> str | None:
        """The auto session's id; None before the first call and after cleanup."""
        return self._binding.session_id

    def options(self, **changes: Any) -> Proxy:
        """A copy with other settings that shares this proxy's channel and auto session."""
        return Proxy(
            self._transport, self._tool, self._opts.replace(**changes), _binding=self._binding
        )

    # -- calls --------------------------------------------------------------------------------

    def __call__(self, *call: Any, **kwargs: Any) -> Any:
        """``await proxy(**kwargs)`` calls this proxy's tool; ``await proxy("tool", {args})``
        calls another tool of the same agent in the same session. With ``streaming=True``
        the call returns a :class:`ChunkStream` to iterate instead."""
        tool, args = _split_call(self._tool, call, kwargs)
        if self._opts.streaming:
            return ChunkStream(self, tool, args)
        return self._unary(tool, args, None)

    async def call_tool(self, tool: str, args: Mapping[str, Any] | None = None) -> Any:
        """Call another tool of this agent, in this proxy's session."""
        return await self._unary(tool, args or {}, None)

    def call_tool_auto(
        self, tool: str | None = None, args: Mapping[str, Any] | None = None
    ) -> ChunkStream:
        """Stream a tool's chunks over one StreamCall, inside this proxy's session.

        An async-iterable argument is sent to the tool as its input stream."""
        return ChunkStream(self, tool or self._tool, dict(args or {}))

    def stream(self, **kwargs: Any) -> ChunkStream:
        """Stream this proxy's tool: ``async for chunk in proxy.stream(x=1)``."""
        return ChunkStream(self, self._tool, kwargs)

    async def _route(self) -> tuple[Endpoint, Metadata | None, bool]:
        """Endpoint and metadata for the next call, and whether it opens the auto session."""
        if self._transport.closed:
            raise UsageError(f"the client of proxy {self._tool!r} is closed; connect again")
        opts = self._opts
        b = self._binding
        if not opts.auto_session:
            if opts.stateful:
                if b.endpoint is None:
                    b.endpoint = self._transport.pick()
                return b.endpoint, None, False
            return self._transport.pick(), None, False
        while True:
            if b.metadata is not None:
                assert b.session_id is not None
                if not b.reused:  # the lifecycle in the log, without a line per call
                    b.reused = True
                    log.info("auto session %s reused", b.session_id[:14])
                try:
                    # The owner, by the session id: gone from the registry means lost.
                    return self._transport.owner(b.session_id), b.metadata, False
                except SessionLost as gone:
                    self._check_lost(gone, b.metadata)
                    raise
            if b.lost is not None:
                lost = b.lost
                raise type(lost)(
                    f"the auto session is lost ({lost.message}); call cleanup_auto_session() "
                    "or leave the proxy's `async with` block to start a new one",
                    code=lost.code,
                    reason=lost.reason,
                    metadata=lost.metadata,
                )
            if b.creating is None:
                b.creating = asyncio.Event()
                return self._transport.pick(), _CREATE, True
            await b.creating.wait()  # another call is opening the session: wait for its id

    def _owner_unreachable(
        self, session_id: str, md: Metadata | None, error: AgentUnavailable
    ) -> SessionLost:
        """A session's owner did not answer: lost for good if the registry has dropped it,
        else unavailable for now (a retry may reach it)."""
        try:
            self._transport.owner(session_id)
        except SessionOwnerLost as gone:
            self._check_lost(gone, md)
            return gone
        return SessionOwnerUnavailable(
            f"the owner of session {session_id[:14]}... cannot be reached: {error.message}",
            code=error.code,
            reason=error.reason,
            metadata={"session_id": session_id},
        )

    def _check_lost(self, error: RemoteError, md: Metadata | None) -> None:
        """A SessionLost on the auto session's own call marks it lost: no silent reopening."""
        b = self._binding
        if isinstance(error, SessionLost) and md is not None and md is b.metadata:
            b.lost = error
            b.metadata = None
            log.info("auto session %s lost: %s", (b.session_id or "")[:14], error.message)

    async def _unary(self, tool: str, args: Mapping[str, Any], session_id: str | None) -> Any:
        """One call with its retries: transport failures are retried ``retry_count`` times
        (the call id makes a retry safe); a new session refused by an agent that is
        shutting down is tried once more on another instance, as nothing ran."""
        message = pb.ExchangeRequest()
        request = message.call
        request.tool = tool
        if args:
            try:
                set_struct(request.arguments, args)
            except NotJsonLike as exc:
                raise UsageError(f"argument {exc}") from None
        opts = self._opts
        if opts.timeout is not None:
            message.timeout.FromNanoseconds(int(opts.timeout * 1e9))
        if opts.retry_count:
            request.call_id = self._binding.next_call_id()
        alone = message.ByteSize() > EXCHANGE_MAX_BYTES  # sized once, not per attempt
        attempt = 0
        moved = False
        while True:
            try:
                return await self._attempt(message, session_id, alone)
            except AgentUnavailable as error:
                if message.create_session and error.reason == Reason.SHUTTING_DOWN and not moved:
                    moved = True
                    continue
                if attempt >= opts.retry_count or isinstance(error, SessionOwnerLost):
                    raise
                attempt += 1
                await asyncio.sleep(opts.retry_delay)

    async def _attempt(
        self, message: pb.ExchangeRequest, session_id: str | None, alone: bool
    ) -> Any:
        b = self._binding
        creating = False
        md: Metadata | None = None
        if session_id is not None:
            if self._transport.closed:
                raise UsageError(f"the client of proxy {self._tool!r} is closed; connect again")
            endpoint = self._transport.owner(session_id)
            message.session_id = session_id
        else:
            endpoint, md, creating = await self._route()
            message.session_id = b.session_id or "" if md is not None else ""
            message.create_session = creating
        failure: RemoteError | None = None
        try:
            if alone:
                new_id, value, failure = await self._call_alone(endpoint, message)
            else:
                answer = await exchange_for(endpoint).call(message, self._opts.timeout)
                new_id, value = answer.session_id, answer.result
                if answer.HasField("error"):
                    error = answer.error
                    failure = map_status(status_code(error.code), error.message, error.details)
        except AgentUnavailable as unreachable:
            if creating:
                b.established(endpoint, None)
            self._transport.failed(endpoint)
            if message.session_id:
                raise self._owner_unreachable(message.session_id, md, unreachable) from None
            raise
        except BaseException:
            if creating:
                b.established(endpoint, None)
            raise
        if creating:
            b.established(endpoint, new_id)
        if failure is not None:
            self._check_lost(failure, md)
            raise failure
        return from_value(value)

    async def _call_alone(
        self, endpoint: Endpoint, message: pb.ExchangeRequest
    ) -> tuple[str, Value, RemoteError | None]:
        """A call too big to share the exchange stream goes as its own unary Call: a
        refusal (say, over the agent's size limit) then fails this call only, and it does not
        hold up the small calls behind it."""
        md: Metadata | None = None
        if message.session_id:
            md = ((SESSION_ID_KEY, message.session_id),)
        elif message.create_session:
            md = _CREATE
        call = endpoint.stub.Call(message.call, metadata=md, timeout=self._opts.timeout)
        try:
            response = await call
        except grpc.aio.AioRpcError as exc:
            failure = map_rpc_error(exc)
            if isinstance(failure, AgentUnavailable):
                raise failure from exc
            return _session_id(exc.initial_metadata()) or "", Value(), failure
        return _session_id(await call.initial_metadata()) or "", response.result, None

    # -- sessions -----------------------------------------------------------------------------

    async def cleanup_auto_session(self) -> None:
        """Close the auto session (if one is open) and forget it; the next call opens anew."""
        b = self._binding
        session_id, lost = b.session_id, b.lost
        b.reset()
        if session_id is None or isinstance(lost, SessionOwnerLost) or self._transport.closed:
            return  # nothing to close, or no channel left to close it on (its TTL will)
        try:
            endpoint = self._transport.owner(session_id)
        except SessionLost:
            return  # its owner is gone, and the session with it
        try:
            await endpoint.stub.CloseSession(
                pb.CloseSessionRequest(session_id=session_id), timeout=5
            )
            log.info("auto session %s closed", session_id[:14])
        except grpc.aio.AioRpcError as exc:
            # The agent is gone or going; its TTL reaps the session. Cleanup must not mask
            # the error that may have brought us here.
            log.warning("auto session %s not closed: %s", session_id[:14], map_rpc_error(exc))

    async def __aenter__(self) -> Proxy:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.shield(self.cleanup_auto_session())

    async def create_session(self) -> str:
        """Open a session explicitly (the manual way); returns its id."""
        endpoint = self._transport.pick()
        try:
            response = await endpoint.stub.CreateSession(
                pb.CreateSessionRequest(tool=self._tool), timeout=self._opts.timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise map_rpc_error(exc) from exc
        return response.session.id

    async def call_with_session(self, *call: Any, session_id: str, **kwargs: Any) -> Any:
        """Call in an explicit session: ``await proxy.call_with_session(session_id=sid, n=1)``."""
        tool, args = _split_call(self._tool, call, kwargs)
        return await self._unary(tool, args, session_id)

    async def close_session(self, session_id: str) -> bool:
        """Close an explicit session; False if it was already closed or unknown."""
        endpoint = self._transport.owner(session_id)
        try:
            response = await endpoint.stub.CloseSession(
                pb.CloseSessionRequest(session_id=session_id), timeout=self._opts.timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise map_rpc_error(exc) from exc
        return response.closed


McpAgent = Proxy
"""The name tools annotate injected dependencies with, as in the design note."""


class ChunkStream:
    """The chunks of one streamed tool call, read with ``async for``.

    Leaving the loop early leaves the call running until ``aclose()`` or the end of an
    ``async with`` block; both cancel it, and the session stays usable.
    """

    __slots__ = (
        "_args",
        "_call",
        "_done",
        "_feeder",
        "_input",
        "_md",
        "_proxy",
        "_responses",
        "_tool",
        "_unacked",
        "_window",
        "_write_lock",
    )

    def __init__(self, proxy: Proxy, tool: str, args: dict[str, Any]) -> None:
        self._proxy = proxy
        self._tool = tool
        self._input: AsyncIterable[Any] | None = None
        for key, value in list(args.items()):
            if isinstance(value, AsyncIterable):
                if self._input is not None:
                    raise UsageError("a streamed call takes at most one async-iterable argument")
                self._input = value
                del args[key]
        self._args = args
        self._call: (
            grpc.aio.StreamStreamCall[pb.StreamCallRequest, pb.StreamCallResponse] | None
        ) = None
        self._window = proxy._opts.buffer_size
        self._unacked = 0
        self._feeder: asyncio.Task[None] | None = None
        self._write_lock = asyncio.Lock()
        self._done = False
        self._md: Metadata | None = None
        self._responses: AsyncIterator[pb.StreamCallResponse] | None = None

    def __aiter__(self) -> ChunkStream:
        return self

    async def __aenter__(self) -> ChunkStream:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def _open(self) -> grpc.aio.StreamStreamCall[pb.StreamCallRequest, pb.StreamCallResponse]:
        proxy = self._proxy
        endpoint, md, creating = await proxy._route()
        start = pb.StreamCallRequest()
        start.start.window = self._window
        start.start.call.tool = self._tool
        try:
            set_struct(start.start.call.arguments, self._args)
        except NotJsonLike as exc:
            if creating:
                proxy._binding.established(endpoint, None)
            raise UsageError(f"argument {exc}") from None
        call = endpoint.stub.StreamCall(metadata=md, timeout=proxy._opts.stream_timeout)
        self._call = call
        try:
            await call.write(start)
            # The headers bring the window the agent grants and, for a new session, its id.
            initial = await call.initial_metadata()
            granted = initial.get(STREAM_WINDOW_KEY) if initial is not None else None
            if granted:
                self._window = min(self._window, int(granted))
            if creating:
                proxy._binding.established(endpoint, _session_id(initial))
        except grpc.aio.AioRpcError as exc:
            if creating:
                proxy._binding.established(endpoint, _session_id(exc.initial_metadata()))
            error = map_rpc_error(exc)
            proxy._check_lost(error, md)
            raise error from exc
        except BaseException:
            if creating:
                proxy._binding.established(endpoint, None)
            raise
        self._md = md
        self._responses = aiter(call)
        if self._input is not None:
            self._feeder = asyncio.get_running_loop().create_task(self._feed(call, self._input))
        else:
            await self._end_input(call)
        return call

    async def _end_input(
        self, call: grpc.aio.StreamStreamCall[pb.StreamCallRequest, pb.StreamCallResponse]
    ) -> None:
        # With a window the stream stays open for credit; otherwise half-close ends the input.
        if self._window:
            async with self._write_lock:
                await call.write(pb.StreamCallRequest(input_end=pb.InputEnd()))
        else:
            await call.done_writing()

    async def _feed(
        self,
        call: grpc.aio.StreamStreamCall[pb.StreamCallRequest, pb.StreamCallResponse],
        source: AsyncIterable[Any],
    ) -> None:
        try:
            async for item in source:
                message = pb.StreamCallRequest()
                set_value(message.input, item)
                async with self._write_lock:
                    await call.write(message)
            await self._end_input(call)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass  # the call ended; __anext__ reports why

    async def __anext__(self) -> Any:
        if self._done:
            raise StopAsyncIteration
        call = self._call or await self._open()
        responses = self._responses
        assert responses is not None
        try:
            # grpc's own response iterator: cheaper per message than call.read().
            message = await anext(responses)
        except StopAsyncIteration:
            self._finish()
            raise
        except grpc.aio.AioRpcError as exc:
            self._finish()
            error = map_rpc_error(exc)
            self._proxy._check_lost(error, self._md)
            raise error from exc
        if message.HasField("end"):
            # The tool is done. Half-close (the agent waits for it, so no credit we send
            # races the end), then read the status: EOF, or the error it ended with.
            self._window = 0
            async with self._write_lock:
                if self._feeder is not None:
                    self._feeder.cancel()
                with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    await call.done_writing()
            return await self.__anext__()
        if self._window:
            self._unacked += 1
            if self._unacked * 2 >= self._window:
                credit, self._unacked = self._unacked, 0
                async with self._write_lock:
                    # The agent may have finished already; the next read tells how it ended.
                    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                        await call.write(pb.StreamCallRequest(credit=credit))
        return from_value(message.chunk)

    def _finish(self) -> None:
        self._done = True
        if self._feeder is not None:
            self._feeder.cancel()

    async def aclose(self) -> None:
        """Stop the stream; the tool is cancelled on the agent."""
        self._finish()
        if self._call is not None and not self._call.done():
            self._call.cancel()

    def __del__(self) -> None:
        if self._call is not None and not self._call.done():
            self._call.cancel()


def _session_id(initial: grpc.aio.Metadata | None) -> str | None:
    value = initial.get(SESSION_ID_KEY) if initial is not None else None
    return str(value) if value else None
