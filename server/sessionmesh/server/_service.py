"""The SessionService RPCs: thin adapters that move calls between gRPC and the runner."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any

import grpc

from sessionmesh import tracing
from sessionmesh.core._tasks import cancel_and_wait
from sessionmesh.server._errors import Fail, invalid_arguments, invalid_stream, moved
from sessionmesh.server._exchange import Exchanges
from sessionmesh.server._handlers import Undecodable
from sessionmesh.server._runner import Runner
from sessionmesh.server._security import Authenticator, denied
from sessionmesh.server._sessions import SessionNotFoundError
from sessionmesh.server._streaming import END_MESSAGE, HALF_CLOSE_WAIT, ChunkSink, Flow, pump
from sessionmesh.v1 import session_service_pb2 as pb
from sessionmesh.v1 import session_service_pb2_grpc as pb_grpc
from sessionmesh.wire.keys import (
    SESSION_CREATE_KEY,
    SESSION_ID_KEY,
    STREAM_WINDOW_KEY,
)
from sessionmesh.wire.limits import DEFAULT_MAX_CALLS_PER_STREAM
from sessionmesh.wire.names import is_durable, short
from sessionmesh.wire.reasons import Reason

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from sessionmesh.server._move import Mover
    from sessionmesh.server._tool import BoundTool


def _metadata(context: grpc.aio.ServicerContext[Any, Any]) -> tuple[str, bool]:
    """The call's session id and whether it asks to open a session (``x-session-create``
    must say ``1`` or ``true``: anything else is refused, not read as yes)."""
    session_id = ""
    create = False
    for key, value in context.invocation_metadata() or ():
        if key == SESSION_ID_KEY:
            if session_id:
                raise invalid_arguments(
                    SESSION_ID_KEY, f"'{SESSION_ID_KEY}' appears twice: send it once"
                )
            session_id = str(value)
        elif key == SESSION_CREATE_KEY:
            if str(value).lower() not in ("1", "true"):
                raise invalid_arguments(
                    SESSION_CREATE_KEY,
                    f"'{SESSION_CREATE_KEY}' opens a session when it is '1' or 'true'; leave "
                    f"it out for a call without a new session (got {str(value)[:20]!r})",
                )
            create = True
    return session_id, create


class Servicer(pb_grpc.SessionServiceServicer):
    """The SessionService RPCs as thin adapters over one :class:`Runner`."""

    def __init__(
        self,
        runner: Runner,
        auth: Authenticator | None = None,
        max_calls_per_stream: int = DEFAULT_MAX_CALLS_PER_STREAM,
    ) -> None:
        self.runner = runner
        self.max_calls_per_stream = max_calls_per_stream
        self.auth = auth if auth is not None else Authenticator()
        self.store = runner.store
        self.exchanges = Exchanges(runner, max_calls_per_stream)
        #: Hands sessions over and takes them (set by the agent; None: they never move).
        self.mover: Mover | None = None
        self.tool_descriptions = [_describe(b) for b in runner.bound_tools]
        self._list_tools = pb.ListToolsResponse(
            agent_name=runner.agent_name,
            instance_id=self.store.instance_id,
            tools=self.tool_descriptions,
        )

    @property
    def draining(self) -> bool:
        return self.runner.draining

    # -- RPCs ---------------------------------------------------------------------------------

    async def Call(
        self, request: pb.CallRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CallResponse:
        try:
            principal = await self.auth.principal(context) if self.auth.on else ""
            plan = self.runner.plan(request, *_metadata(context), principal)
            plan.expires_in(context.time_remaining())
            if tracing.tracer() is not None:
                plan.carrier = _trace_headers(context)
            try:
                if plan.new_id:
                    await context.send_initial_metadata(((SESSION_ID_KEY, plan.new_id),))
                response = pb.CallResponse()
                await self.runner.answer(plan, response.result)
                return response
            except BaseException:
                plan.abandon()  # if it never got its turn
                raise
        except Fail as fail:
            await context.abort_with_status(fail.status())
            raise  # abort_with_status raises; this line is for the type checker

    async def Exchange(  # type: ignore[override]  # writes with context.write
        self,
        request_iterator: AsyncIterator[pb.ExchangeRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        await self.exchanges.serve(request_iterator, context, await self.auth.caller(context))

    def drain(self) -> None:
        """Take no new sessions or calls: Exchange streams stop reading and end once the
        calls they carry are answered (the client then sees the stream end)."""
        self.runner.draining = True
        self.exchanges.stop_reading()

    async def StreamCall(  # type: ignore[override]  # writes with context.write
        self,
        request_iterator: AsyncIterator[pb.StreamCallRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        requests = aiter(request_iterator)
        pumping: asyncio.Task[None] | None = None
        flow: Flow | None = None
        failure: Fail | None = None
        abandon: Callable[[], None] | None = None
        opened = ""  # the session this stream opened, if it did
        try:
            try:
                first = await anext(requests)
            except StopAsyncIteration:
                raise invalid_stream("the stream ended before its first message (start)") from None
            if isinstance(first, Undecodable):
                raise first.fail()
            if first.WhichOneof("kind") != "start":
                raise invalid_stream("the first message of a StreamCall must be 'start'")
            start = first.start
            principal = await self.auth.principal(context) if self.auth.on else ""
            plan = self.runner.plan(start.call, *_metadata(context), principal)
            plan.expires_in(context.time_remaining())
            if tracing.tracer() is not None:
                plan.carrier = _trace_headers(context)
            abandon = plan.abandon
            if plan.created:
                opened = plan.new_id
            bound = plan.bound
            flow = Flow(min(start.window, bound.spec.options.buffer_size) if start.window else 0)
            flow.max_batch = start.max_batch
            headers = []
            if plan.new_id:
                headers.append((SESSION_ID_KEY, plan.new_id))
            if flow.window:
                headers.append((STREAM_WINDOW_KEY, str(flow.window)))
            if headers:
                await context.send_initial_metadata(tuple(headers))
            if bound.input_param:
                plan.kwargs[bound.input_param] = flow.open_inputs(bound.spec.options.buffer_size)
            me = asyncio.current_task()
            assert me is not None
            # The pump reads on while the tool runs (credit, input) and past its end (the
            # half-close); this handler owns it and waits for it on every way out.
            pumping = asyncio.get_running_loop().create_task(pump(requests, flow, me))
            try:
                await self.runner.stream(plan, ChunkSink(context.write, flow))
                flow.finished = True
            except asyncio.CancelledError:
                if flow.error is None:
                    raise
                flow.error_heard = True
                raise flow.error from None
            finally:
                flow.discard_inputs()
        except Fail as fail:
            failure = fail
            if abandon is not None:
                abandon()
        except BaseException:
            if abandon is not None:
                abandon()
            if pumping is not None:
                await cancel_and_wait(pumping)
            raise
        if pumping is not None and flow is not None:
            await self._finish(context, flow, pumping, tell_end=failure is None)
        if failure is None and flow is not None:
            failure = flow.error  # the client broke the protocol after the tool was done
        if failure is not None and opened and flow is not None and failure is flow.error:
            # Refused for the client's own protocol error: the session it opened for this
            # stream is closed with it, not left to its idle TTL.
            self.store.close_soon(opened, "its opening stream broke the protocol")
        if failure is not None:
            await context.abort_with_status(failure.status())

    @staticmethod
    async def _finish(
        context: grpc.aio.ServicerContext[Any, Any],
        flow: Flow,
        pumping: asyncio.Task[None],
        *,
        tell_end: bool,
    ) -> None:
        """After the tool: with a window, tell the client it is over and wait (briefly)
        for its half-close, so no credit it still sends races the end; then end the pump.
        A protocol error the pump found meanwhile interrupts this task (its cancel) and is
        heard here: it must never leave the handler as a CancelledError, which gRPC would
        take for the client's own cancel and answer with no status at all."""
        try:
            if flow.window and tell_end:
                with contextlib.suppress(Exception):
                    await context.write(END_MESSAGE)
                    await asyncio.wait_for(asyncio.shield(pumping), HALF_CLOSE_WAIT)
            await cancel_and_wait(pumping)
        except asyncio.CancelledError:
            if flow.error is None:
                raise
            flow.error_heard = True  # the client's protocol error came as the tool ended
            await cancel_and_wait(pumping)

    async def CreateSession(
        self, request: pb.CreateSessionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CreateSessionResponse:
        try:
            principal = await self.auth.principal(context) if self.auth.on else ""
            bound = self.runner.tool(request.tool) if request.tool else None
            session = self.runner.new_session(bound, principal)
            if self.runner.durability is not None:
                try:  # answered only once it is in the store: it outlives this instance
                    await self.runner.durability.save(session)
                except Fail:
                    self.store.release(session.id, "its first save failed")
                    raise
        except Fail as fail:
            await context.abort_with_status(fail.status())
            raise
        response = pb.CreateSessionResponse()
        response.session.id = session.id
        response.session.instance_id = self.store.instance_id
        response.session.idle_timeout.FromNanoseconds(int(session.ttl * 1e9))
        return response

    async def CloseSession(
        self, request: pb.CloseSessionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CloseSessionResponse:
        session_id = request.session_id
        principal = await self.auth.caller(context) if self.auth.on else ""
        durability = self.runner.durability
        if durability is not None and is_durable(session_id) and session_id not in self.store:
            # Kept in the store and owned elsewhere (or by nobody now): closed there.
            try:
                closed = await durability.close_elsewhere(session_id, principal)
            except Fail as fail:
                await context.abort_with_status(fail.status())
                raise
            return pb.CloseSessionResponse(closed=closed)
        moving = self.store.moving(session_id)
        if moving is not None:
            await asyncio.shield(moving)  # then closed here, or redirected to where it went
        moved_to = self.store.moved_to(session_id, principal)
        if moved_to is not None and session_id not in self.store:
            # It lives on another replica now: the caller closes it there.
            await context.abort_with_status(
                moved(session_id, moved_to, self.runner.locate).status()
            )
        if self.auth.on:
            try:
                self.store.get(session_id, principal)
            except SessionNotFoundError:
                return pb.CloseSessionResponse(closed=False)  # as for an id nobody has
        carrier = _trace_headers(context) if tracing.tracer() is not None else None
        with tracing.span("CloseSession", carrier):
            return pb.CloseSessionResponse(closed=await self.store.close(session_id))

    async def ListSessions(
        self, request: pb.ListSessionsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListSessionsResponse:
        mine: str | None = None  # whose sessions to list (None: everyone's)
        if self.auth.on:
            mine = await self.auth.caller(context)
            if mine in self.auth.admins:
                mine = None
        response = pb.ListSessionsResponse(
            instance_id=self.store.instance_id, calls_served=self.runner.calls_served
        )
        now = time.monotonic()
        for session in self.store.sessions():
            if mine is not None and session.principal != mine:
                continue
            info = response.sessions.add(
                short_id=short(session.id), active=session.active > 0, waiting=session.waiting
            )
            info.idle.FromNanoseconds(0 if session.active else int((now - session.last_used) * 1e9))
            info.idle_timeout.FromNanoseconds(int(session.ttl * 1e9))
        return response

    async def AcceptSession(
        self, request: pb.AcceptSessionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.AcceptSessionResponse:
        mover = await self._mover(context, "hand sessions over")
        try:
            mover.accept(request)
        except Fail as fail:
            await context.abort_with_status(fail.status())
            raise
        return pb.AcceptSessionResponse()

    async def MoveSessions(
        self, request: pb.MoveSessionsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.MoveSessionsResponse:
        mover = await self._mover(context, "move sessions")
        try:
            return await mover.move_some(request.to_instance, request.session_id, request.count)
        except Fail as fail:
            await context.abort_with_status(fail.status())
            raise

    async def _mover(self, context: grpc.aio.ServicerContext[Any, Any], what: str) -> Mover:
        """The mover, for an admin caller: with authentication on, only principals named
        in ``admins`` (replicas present their own credentials) may move sessions."""
        if self.auth.on:
            principal = await self.auth.caller(context)
            if principal not in self.auth.admins:
                await context.abort_with_status(
                    denied(
                        f"{principal} may not {what}: only the agent's admins may (--admin); "
                        "list the agent's own principal there so its replicas can"
                    ).status()
                )
        if self.mover is None:
            await context.abort_with_status(
                Fail(Reason.SHUTTING_DOWN, "this agent is not serving").status()
            )
        assert self.mover is not None
        return self.mover

    async def ListTools(
        self, request: pb.ListToolsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListToolsResponse:
        if self.auth.on:
            await self.auth.caller(context)
        return self._list_tools


def _trace_headers(context: grpc.aio.ServicerContext[Any, Any]) -> dict[str, str]:
    """The W3C trace context among a call's headers."""
    return {
        key: str(value)
        for key, value in context.invocation_metadata() or ()
        if key in ("traceparent", "tracestate")
    }


def _describe(bound: BoundTool) -> pb.Tool:
    spec = bound.spec
    tool = pb.Tool(
        name=spec.name,
        capability=spec.capability,
        description=spec.description,
        tags=spec.tags,
        version=spec.version or "",
        streaming=spec.options.streaming,
        session_required=bound.requires_session,
        stateful=spec.options.stateful,
    )
    tool.parameters_schema.update(bound.schema)
    tool.output_schema.update(bound.output_schema)
    return tool
