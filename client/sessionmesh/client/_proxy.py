"""Proxies: call an agent's tools, with sessions managed for you."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal, overload

from sessionmesh import tracing
from sessionmesh.client._auto_session import AutoSession, Route
from sessionmesh.client._encode import Big, checked_session_id, encode_arguments, split_call
from sessionmesh.client._reroute import (
    MAX_HOPS,
    MAX_SEEKS,
    Rerouted,
    backoff,
    follow,
    seek_after,
)
from sessionmesh.client._stream import ChunkStream
from sessionmesh.core._deadline import bounded
from sessionmesh.core._options import ProxyOptions
from sessionmesh.core._reasons import in_python_terms
from sessionmesh.core._tallies import FAILOVER, RETRY, client_events
from sessionmesh.errors import (
    AgentUnavailable,
    CallTimeout,
    RemoteError,
    SessionLost,
    SessionOwnerLost,
    SessionOwnerUnavailable,
    ToolNotFound,
    UsageError,
)
from sessionmesh.v1 import session_service_pb2 as pb
from sessionmesh.wire.codec import from_value
from sessionmesh.wire.names import is_durable, short
from sessionmesh.wire.reasons import Reason

if TYPE_CHECKING:
    from types import TracebackType

    from sessionmesh.client._transport import Transport

log = logging.getLogger("sessionmesh.proxy")


def make_proxy(
    transport: Transport, tool: str, opts: ProxyOptions, auto: AutoSession | None = None
) -> Proxy | StreamingProxy:
    """The proxy class the options call for."""
    cls = StreamingProxy if opts.streaming else Proxy
    return cls(transport, tool, opts, auto)


class BaseProxy:
    """Calls one tool of an agent (and, by name, its other tools), inside a session if asked.

    With ``session_required=True`` (and ``auto_session_management``, the default) the first
    call opens a session, later calls reuse it on the instance that owns it, and
    ``cleanup_auto_session()`` or leaving ``async with proxy:`` closes it. A call that finds
    the session gone raises :class:`~sessionmesh.errors.SessionLost`; the proxy then
    refuses further calls until it is cleaned up, so state is never silently reset.

    Example::

        async with mesh.connect("127.0.0.1:50051") as agent:
            async with agent.proxy("session_counter", session_required=True) as counter:
                assert [await counter(increment=n) for n in (1, 2, 3)] == [1, 3, 6]

    Options: ``timeout`` is each call's deadline; ``retry_count``/``retry_delay`` retry a call
    that could not reach the agent, backing off exponentially from ``retry_delay`` with
    jitter (each call carries an id, so a retry never runs a tool twice); ``stream_timeout``
    bounds a whole stream; ``buffer_size`` is how many chunks a stream may have in flight
    before a slow reader holds the tool back; ``stateful`` pins every call to one instance
    even without a session; ``streaming`` makes ``proxy(...)`` return a chunk stream
    instead of a result.
    """

    __slots__ = ("_auto", "_opts", "_tool", "_transport")

    def __init__(
        self,
        transport: Transport,
        tool: str,
        opts: ProxyOptions | None = None,
        auto: AutoSession | None = None,
    ) -> None:
        self._transport = transport
        self._tool = tool
        self._opts = opts or ProxyOptions()
        self._auto = auto or AutoSession()

    def __repr__(self) -> str:
        sid = self._auto.session_id
        return f"<{type(self).__name__} {self._tool!r}{' session ' + short(sid) if sid else ''}>"

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
        return self._auto.session_id

    @property
    def _current_session_id(self) -> str | None:
        """``session_id``, by the name the design note uses."""
        return self._auto.session_id

    def _copy(self, changes: dict[str, Any]) -> Proxy | StreamingProxy:
        return make_proxy(self._transport, self._tool, self._opts.replace(**changes), self._auto)

    # -- calls --------------------------------------------------------------------------------

    async def call_tool(self, tool: str, args: Mapping[str, Any] | None = None) -> Any:
        """Call another tool of this agent, in this proxy's session."""
        return await self._unary(tool, args or {}, None)

    def call_tool_auto(
        self,
        tool: str | None = None,
        args: Mapping[str, Any] | None = None,
        *,
        session_id: str | None = None,
    ) -> ChunkStream:
        """Stream a tool's chunks over one StreamCall, inside this proxy's session (or the
        explicit session ``session_id``, from ``create_session()``).

        An async-iterable argument is sent to the tool as its input stream."""
        return ChunkStream(self, tool or self._tool, dict(args or {}), session_id)

    def stream(self, **kwargs: Any) -> ChunkStream:
        """Stream this proxy's tool: ``async for chunk in proxy.stream(x=1)``."""
        return ChunkStream(self, self._tool, kwargs)

    async def route(self, session_id: str | None = None) -> Route:
        """Where the next call goes: its endpoint, session and whether it opens one. With
        ``session_id`` (a manual session) its owner; else the auto session decides."""
        transport = self._transport
        if transport.closed:
            raise UsageError(f"the client of proxy {self._tool!r} is closed; connect again")
        if session_id is not None:
            return Route(transport.owner(checked_session_id(session_id)), session_id)
        opts = self._opts
        if opts.auto_session:
            return await self._auto.route(transport)
        if opts.stateful:
            return Route(self._auto.pin(transport))
        return Route(transport.pick())

    def failed(self, session_id: str, error: BaseException, tool: str = "") -> BaseException:
        """A call of ``tool`` (in ``session_id``, or "" for none) failed with ``error``: what
        to raise, for unary calls and streams alike. An unreachable owner is
        SessionOwnerUnavailable (SessionOwnerLost once it left the mesh); a SessionLost marks
        the auto session lost; the agent's wording is put in Python terms."""
        if isinstance(error, ToolNotFound) and tool and tool != self._tool:
            # proxy("x", {...}): say which form was taken, and the other one.
            return ToolNotFound(
                f"{error.message}. proxy({tool!r}, {{...}}) calls the agent's tool {tool!r}; "
                f"to call {self._tool!r} itself, pass its arguments as keywords: proxy(...=...)",
                code=error.code,
                reason=error.reason,
                metadata=error.metadata,
            )
        if session_id:
            # Only a failure to reach the agent says its owner is unreachable; an answer the
            # agent sent (it has a reason: its store is down, say) says nothing of the kind.
            if (
                isinstance(error, AgentUnavailable)
                and not error.reason
                and not isinstance(error, SessionLost)
            ):
                error = self._owner_unreachable(session_id, error)
            if isinstance(error, SessionLost):
                self._auto.failed(session_id, error)
                tracing.event("session lost", {"sessionmesh.session": short(session_id)})
        return in_python_terms(error) if isinstance(error, RemoteError) else error

    def _owner_unreachable(self, session_id: str, error: AgentUnavailable) -> SessionLost:
        """A session's owner did not answer: lost for good if the registry has dropped it,
        else unavailable for now (a retry may reach it)."""
        try:
            self._transport.owner(session_id)
        except SessionOwnerLost as gone:
            return gone
        return SessionOwnerUnavailable(
            f"the owner of session {short(session_id)}... cannot be reached: {error.message}",
            code=error.code,
            reason=error.reason,
            metadata={"session_id": session_id},
        )

    async def call_once(
        self, call_id: str, *call: Any, session_id: str | None = None, **kwargs: Any
    ) -> Any:
        """A call with an id of the caller's choosing: sent again with the same id (a retry
        after a lost answer, from this process or another), it gets the first call's
        outcome from the agent instead of running twice. In a session the id is kept by
        the session's owner (and moves with it); ids are the caller's own (with
        authentication, per principal)."""
        if not call_id:
            raise UsageError("call_once needs a call id")
        tool, args = split_call(self._tool, call, kwargs)
        return await self._unary(tool, args, session_id, call_id=call_id)

    async def _unary(
        self, tool: str, args: Mapping[str, Any], session_id: str | None, *, call_id: str = ""
    ) -> Any:
        """One call with its retries: transport failures are retried ``retry_count`` times
        (the call id makes a retry safe); a new session refused by an agent that is
        shutting down is tried once more on another instance, as nothing ran."""
        message = pb.ExchangeRequest()
        request = message.call
        request.tool = tool
        if args:
            encode_arguments(request.arguments, args)
        opts = self._opts
        # Inside a tool, the call it serves may have a deadline: this call gets no more.
        timeout = bounded(opts.timeout)
        if timeout is not None:
            if timeout <= 0:
                raise CallTimeout(
                    f"no time left for a call to {tool!r}: the deadline of the call this tool "
                    "serves has passed"
                )
            message.timeout.FromNanoseconds(int(timeout * 1e9))
        if call_id:
            request.call_id = call_id
        elif opts.retry_count:
            request.call_id = self._auto.next_call_id()
        tracer = tracing.tracer()
        if tracer is not None:
            with tracing.client_span(tracer, tool, self._tool) as span:
                tracing.inject(message.metadata)
                try:
                    return await self._attempts(message, session_id, timeout)
                finally:
                    if self._auto.session_id:
                        span.set_attribute("sessionmesh.session", short(self._auto.session_id))
        return await self._attempts(message, session_id, timeout)

    async def _attempts(
        self, message: pb.ExchangeRequest, session_id: str | None, deadline: float | None
    ) -> Any:
        opts = self._opts
        # Encoded once: its size decides, and a big call is sent as these very bytes.
        alone = Big.of(message.call)
        attempt = 0
        moved = False
        hops = 0
        while True:
            try:
                return await self._attempt(message, session_id, alone, deadline)
            except Rerouted as rerouted:
                # A session moved, or its owner went: follow it, or look for it (bounded).
                hops += 1
                if hops > (MAX_SEEKS if rerouted.seeking else MAX_HOPS):
                    raise rerouted.error from None
                client_events[FAILOVER] += 1
                continue
            except AgentUnavailable as error:
                if message.create_session and error.reason == Reason.SHUTTING_DOWN and not moved:
                    moved = True
                    client_events[FAILOVER] += 1
                    continue
                if attempt >= opts.retry_count:
                    raise
                attempt += 1
                client_events[RETRY] += 1
                await asyncio.sleep(backoff(opts.retry_delay, attempt))

    async def _attempt(
        self,
        message: pb.ExchangeRequest,
        session_id: str | None,
        alone: Big | None,
        deadline: float | None,
    ) -> Any:
        route = await self.route(session_id)
        endpoint, sid = route.endpoint, route.session_id
        message.session_id = sid
        message.create_session = route.create
        durable = is_durable(sid)
        if durable and not message.call.call_id:
            # It may run on another instance if this one fails: the id makes that run once.
            message.call.call_id = self._auto.next_call_id()
        transport = self._transport
        with route.settling():
            try:
                answer = await endpoint.call(
                    message, deadline, alone=alone.encoded(message.call) if alone else None
                )
            except AgentUnavailable as unreachable:
                transport.failed(endpoint)
                self._auto.unpin(endpoint)
                if not sid:
                    raise
                if not durable:
                    seek_after(transport, sid, endpoint, unreachable)
                lost = self.failed(sid, unreachable)
                if durable and transport.owner(sid) is not endpoint:
                    raise Rerouted(lost) from None  # another instance takes it over
                raise lost from None
            route.opened(answer.session_id)
        error = answer.error
        if error is not None:
            follow(transport, sid, endpoint, error)
            raise self.failed(sid, error, message.call.tool)
        if sid and (transport.homes or transport.seeking):
            transport.settle(sid, endpoint)
        return from_value(answer.value)

    # -- sessions -----------------------------------------------------------------------------

    def detach_session(self) -> str | None:
        """Hand this proxy's auto session to the caller: its id (None if none is open), and
        the proxy no longer closes it (the caller does, with ``close_session``, or its idle
        TTL). The next call opens a new one."""
        session_id, _ = self._auto.reset()
        return session_id

    async def cleanup_auto_session(self) -> None:
        """Close the auto session (if one is open) and forget it; the next call opens anew."""
        await self._auto.close(self._transport)

    async def __aenter__(self) -> BaseProxy:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.shield(self.cleanup_auto_session())

    async def create_session(self) -> str:
        """Open a session explicitly (the manual way); returns its id."""
        return await self._transport.pick().create_session(self._tool, self._opts.timeout)

    async def call_with_session(self, *call: Any, session_id: str, **kwargs: Any) -> Any:
        """Call in an explicit session: ``await proxy.call_with_session(session_id=sid, n=1)``."""
        tool, args = split_call(self._tool, call, kwargs)
        return await self._unary(tool, args, session_id)

    async def close_session(self, session_id: str) -> bool:
        """Close an explicit session; False if it was already closed or unknown."""
        try:
            return await self._transport.close_session(
                checked_session_id(session_id), self._opts.timeout
            )
        finally:
            self._transport.forget(session_id)


class Proxy(BaseProxy):
    """A proxy whose call returns the tool's result: ``await proxy(**kwargs)``."""

    __slots__ = ()

    @overload
    def options(self, *, streaming: Literal[True], **changes: Any) -> StreamingProxy: ...
    @overload
    def options(self, *, streaming: Literal[False] = ..., **changes: Any) -> Proxy: ...
    def options(self, **changes: Any) -> Proxy | StreamingProxy:
        """A copy with other settings that shares this proxy's channel and auto session."""
        return self._copy(changes)

    def __call__(self, *call: Any, **kwargs: Any) -> Any:
        """``await proxy(**kwargs)`` calls this proxy's tool; ``await proxy("tool", {args})``
        calls another tool of the same agent in the same session. In a plain ``def`` tool
        (a worker thread, no event loop) the call blocks and returns the result itself: so
        the type is ``Any``, the awaitable in async code and the result in a thread."""
        tool, args = split_call(self._tool, call, kwargs)
        work = self._unary(tool, args, None)
        if asyncio._get_running_loop() is None:
            return self._transport.blocking(work)
        return work

    async def __aenter__(self) -> Proxy:
        return self


class StreamingProxy(BaseProxy):
    """A proxy (``streaming=True``) whose call returns a :class:`ChunkStream` to iterate:
    ``async for chunk in proxy(**kwargs)``."""

    __slots__ = ()

    @overload
    def options(self, *, streaming: Literal[False], **changes: Any) -> Proxy: ...
    @overload
    def options(self, *, streaming: Literal[True] = ..., **changes: Any) -> StreamingProxy: ...
    def options(self, **changes: Any) -> Proxy | StreamingProxy:
        """A copy with other settings that shares this proxy's channel and auto session."""
        return self._copy(changes)

    def __call__(self, *call: Any, **kwargs: Any) -> ChunkStream:
        tool, args = split_call(self._tool, call, kwargs)
        return ChunkStream(self, tool, args)

    async def __aenter__(self) -> StreamingProxy:
        return self


McpAgent = Proxy
"""The name tools annotate injected dependencies with, as in the design note."""
