"""The SessionService servicer: sessions, dedup, ordering and tool invocation over gRPC."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
import traceback
from typing import TYPE_CHECKING, Any

import grpc

from sessionmesh.client._codec import NotJsonLike, from_struct, from_value, set_value
from sessionmesh.client._wire import SESSION_CREATE_KEY, SESSION_ID_KEY, Reason
from sessionmesh.server._errors import (
    Fail,
    invalid_arguments,
    invalid_stream,
    not_json,
    session_not_found,
    tool_not_found,
)
from sessionmesh.server._params import ArgumentError
from sessionmesh.server._session import (
    Session,
    SessionNotFoundError,
    SessionStore,
    TooManySessionsError,
    _current,
)
from sessionmesh.v1 import session_service_pb2 as pb
from sessionmesh.v1 import session_service_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from google.protobuf import struct_pb2

    from sessionmesh.server._inject import Injector
    from sessionmesh.server._tool import BoundTool

#: How many call ids of calls without a session (or that opened one) the agent remembers.
RECENT_CALLS = 10_000
#: How long a finished flow-controlled stream waits for the client's half-close.
HALF_CLOSE_WAIT = 5.0

_END = object()
_END_MESSAGE = pb.StreamCallResponse(end=pb.StreamEnd())


class _Flow:
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

    async def before_send(self) -> None:
        if self.window:
            while self.sent >= self.allowed:
                self.changed.clear()
                await self.changed.wait()
            self.sent += 1


class Servicer(pb_grpc.SessionServiceServicer):
    def __init__(
        self,
        *,
        agent_name: str,
        tools: dict[str, BoundTool],
        store: SessionStore,
        injector: Injector,
        debug: bool = False,
    ) -> None:
        self.agent_name = agent_name
        self.tools = tools
        self.store = store
        self.injector = injector
        self.debug = debug
        self.draining = False
        self._recent: collections.OrderedDict[str, tuple[str, asyncio.Future[Any]]] = (
            collections.OrderedDict()
        )
        unique = {id(b): b for b in tools.values()}
        self._list_tools = pb.ListToolsResponse(
            agent_name=agent_name,
            instance_id=store.instance_id,
            tools=[_describe(b) for b in unique.values()],
        )
        self._tool_names = sorted({b.spec.name for b in unique.values()})

    # -- resolution ---------------------------------------------------------------------------

    def _tool(self, name: str) -> BoundTool:
        bound = self.tools.get(name)
        if bound is None:
            raise tool_not_found(name, self._tool_names)
        return bound

    def _new_session(self, bound: BoundTool | None) -> Session:
        if self.draining:
            raise Fail(
                grpc.StatusCode.UNAVAILABLE,
                Reason.SHUTTING_DOWN,
                f"agent {self.agent_name!r} is shutting down and takes no new sessions",
            )
        try:
            return self.store.create(bound.spec.session_ttl if bound else None)
        except TooManySessionsError as exc:
            raise Fail(
                grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.TOO_MANY_SESSIONS, str(exc)
            ) from None

    async def _session_for(
        self, bound: BoundTool, context: grpc.aio.ServicerContext[Any, Any], call_id: str
    ) -> tuple[Session | None, asyncio.Future[Any] | None, bool]:
        """The call's session (found, or created for ``x-session-create``), the remembered
        outcome of an earlier call with the same id if any, and whether the session is new."""
        session_id = ""
        create = False
        for key, value in context.invocation_metadata() or ():
            if key == SESSION_ID_KEY:
                session_id = str(value)
            elif key == SESSION_CREATE_KEY:
                create = True
        if session_id:
            try:
                session = self.store.get(session_id)
            except SessionNotFoundError:
                raise session_not_found(session_id) from None
            return session, (session.remembered(call_id) if call_id else None), False
        if create:
            if call_id and call_id in self._recent:
                # A retry of a call that opened a session: the same session, the same outcome.
                sid, outcome = self._recent[call_id]
                await context.send_initial_metadata(((SESSION_ID_KEY, sid),))
                return None, outcome, False
            session = self._new_session(bound)
            await context.send_initial_metadata(((SESSION_ID_KEY, session.id),))
            return session, None, True
        if bound.requires_session:
            raise Fail(
                grpc.StatusCode.FAILED_PRECONDITION,
                Reason.SESSION_REQUIRED,
                f"tool {bound.spec.name!r} needs a session: send '{SESSION_ID_KEY}: <id>' from "
                f"CreateSession, or '{SESSION_CREATE_KEY}: 1' to open one with this call",
            )
        return None, (self._recent[call_id][1] if call_id in self._recent else None), False

    def _remember(
        self, session: Session | None, call_id: str, outcome: asyncio.Future[Any], created: bool
    ) -> None:
        if session is not None:
            session.remember(call_id, outcome)
        if session is None or created:
            self._recent[call_id] = (session.id if session else "", outcome)
            if len(self._recent) > RECENT_CALLS:
                self._recent.popitem(last=False)

    # -- running tools ------------------------------------------------------------------------

    def _bind(
        self, bound: BoundTool, arguments: struct_pb2.Struct, session: Session | None
    ) -> dict[str, Any]:
        try:
            return bound.bind(from_struct(arguments), session)
        except ArgumentError as exc:
            raise invalid_arguments(exc.field, str(exc)) from None

    def _tool_failed(self, bound: BoundTool, exc: BaseException) -> Fail:
        if isinstance(exc, Fail):
            return exc
        if isinstance(exc, TimeoutError):
            return Fail(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                Reason.TOOL_TIMEOUT,
                f"tool {bound.spec.name!r} ran past its timeout",
                {"type": "TimeoutError", "message": str(exc)},
            )
        kind = type(exc).__name__
        return Fail(
            grpc.StatusCode.UNKNOWN,
            Reason.TOOL_FAILED,
            f"tool {bound.spec.name!r} raised {kind}: {exc}",
            {"type": kind, "message": str(exc)},
            debug="".join(traceback.format_exception(exc)) if self.debug else "",
        )

    async def _enter(self, session: Session | None) -> None:
        if session is None:
            return
        session.waiting += 1
        try:
            await session.lock.acquire()
        finally:
            session.waiting -= 1
        if session.closed:
            session.lock.release()
            raise session_not_found(session.id)
        session.active += 1

    @staticmethod
    def _leave(session: Session | None) -> None:
        if session is not None:
            session.active -= 1
            session.last_used = time.monotonic()
            session.lock.release()

    async def _run(
        self, bound: BoundTool, arguments: struct_pb2.Struct, session: Session | None
    ) -> pb.CallResponse:
        kwargs = self._bind(bound, arguments, session)
        await self._enter(session)
        token = _current.set(session)
        try:
            async with self.injector.scope(bound, session, kwargs):
                try:
                    async with asyncio.timeout(bound.spec.timeout):
                        result = await bound.invoke(kwargs)
                except Exception as exc:
                    raise self._tool_failed(bound, exc) from None
            response = pb.CallResponse()
            try:
                set_value(response.result, result)
            except NotJsonLike as exc:
                raise not_json(bound.spec.name, "returned", exc) from None
            return response
        finally:
            _current.reset(token)
            self._leave(session)

    # -- RPCs ---------------------------------------------------------------------------------

    async def Call(
        self, request: pb.CallRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CallResponse:
        try:
            bound = self._tool(request.tool)
            session, earlier, created = await self._session_for(bound, context, request.call_id)
            return await self._execute(bound, request, session, earlier, created)
        except Fail as fail:
            await context.abort_with_status(fail.status())
            raise  # abort_with_status raises; this line is for the type checker

    async def _execute(
        self,
        bound: BoundTool,
        request: pb.CallRequest,
        session: Session | None,
        earlier: asyncio.Future[Any] | None,
        created: bool,
    ) -> pb.CallResponse:
        if earlier is not None:
            return await asyncio.shield(earlier)
        call_id = request.call_id
        if not call_id:
            return await self._run(bound, request.arguments, session)
        # With a call id the tool must run once even if this RPC is cancelled (its
        # connection dropped): it runs in its own task and a retry awaits the same outcome.
        task = asyncio.get_running_loop().create_task(self._run(bound, request.arguments, session))
        task.add_done_callback(_consume)
        self._remember(session, call_id, task, created)
        return await asyncio.shield(task)

    async def CallStream(  # type: ignore[override]  # writes with context.write
        self,
        request_iterator: AsyncIterator[pb.CallStreamRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        try:
            session = await self._stream_session(context)
        except Fail as fail:
            await context.abort_with_status(fail.status())
            return
        async for message in request_iterator:
            request = message.call
            answer = pb.CallStreamResponse()
            try:
                bound = self._tool(request.tool)
                call_id = request.call_id
                earlier = session.remembered(call_id) if call_id else None
                work = self._execute(bound, request, session, earlier, False)
                if message.HasField("timeout"):
                    try:
                        async with asyncio.timeout(message.timeout.ToNanoseconds() / 1e9):
                            response = await work
                    except TimeoutError:
                        raise Fail(
                            grpc.StatusCode.DEADLINE_EXCEEDED, "", "Deadline Exceeded"
                        ) from None
                else:
                    response = await work
                answer.result.CopyFrom(response.result)
            except Fail as fail:
                error = answer.error
                error.code = fail.code.value[0]
                error.message = fail.message
                error.details.extend(fail.details())
            await context.write(answer)

    async def _stream_session(self, context: grpc.aio.ServicerContext[Any, Any]) -> Session:
        session_id = ""
        create = False
        for key, value in context.invocation_metadata() or ():
            if key == SESSION_ID_KEY:
                session_id = str(value)
            elif key == SESSION_CREATE_KEY:
                create = True
        if session_id:
            try:
                return self.store.get(session_id)
            except SessionNotFoundError:
                raise session_not_found(session_id) from None
        if create:
            session = self._new_session(None)
            await context.send_initial_metadata(((SESSION_ID_KEY, session.id),))
            return session
        raise Fail(
            grpc.StatusCode.FAILED_PRECONDITION,
            Reason.SESSION_REQUIRED,
            f"CallStream carries the calls of one session: send '{SESSION_ID_KEY}: <id>' or "
            f"'{SESSION_CREATE_KEY}: 1'",
        )

    async def StreamCall(  # type: ignore[override]  # writes with context.write
        self,
        request_iterator: AsyncIterator[pb.StreamCallRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        requests = aiter(request_iterator)
        pump: asyncio.Task[None] | None = None
        flow: _Flow | None = None
        failure: Fail | None = None
        try:
            try:
                first = await anext(requests)
            except StopAsyncIteration:
                raise invalid_stream("the stream ended before its first message (start)") from None
            if first.WhichOneof("kind") != "start":
                raise invalid_stream("the first message of a StreamCall must be 'start'")
            start = first.start
            bound = self._tool(start.call.tool)
            session, _, _ = await self._session_for(bound, context, "")
            flow = _Flow(min(start.window, bound.spec.buffer_size) if start.window else 0)
            kwargs = self._bind(bound, start.call.arguments, session)
            if bound.input_param:
                flow.inputs = asyncio.Queue(maxsize=bound.spec.buffer_size)
                kwargs[bound.input_param] = _drain(flow.inputs)
            me = asyncio.current_task()
            assert me is not None
            pump = asyncio.get_running_loop().create_task(_pump(requests, flow, me))
            try:
                await self._stream(bound, session, kwargs, flow, context)
            except asyncio.CancelledError:
                if flow.error is None:
                    raise
                raise flow.error from None
        except Fail as fail:
            failure = fail
        except BaseException:
            if pump is not None:
                pump.cancel()
            raise
        if flow is not None and flow.window and pump is not None:
            # Tell the client it is over and wait (briefly) for its half-close, so no credit
            # it is still sending races the end of the call.
            flow.finished = True
            flow.discard_inputs()
            with contextlib.suppress(Exception):
                await context.write(_END_MESSAGE)
                await asyncio.wait_for(asyncio.shield(pump), HALF_CLOSE_WAIT)
        if pump is not None:
            pump.cancel()
        if failure is not None:
            await context.abort_with_status(failure.status())

    async def _stream(
        self,
        bound: BoundTool,
        session: Session | None,
        kwargs: dict[str, Any],
        flow: _Flow,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        await self._enter(session)
        token = _current.set(session)
        try:
            async with self.injector.scope(bound, session, kwargs):
                try:
                    async with asyncio.timeout(bound.spec.stream_timeout):
                        async for item in bound.iterate(kwargs):
                            message = pb.StreamCallResponse()
                            try:
                                set_value(message.chunk, item)
                            except NotJsonLike as exc:
                                raise not_json(bound.spec.name, "yielded", exc) from None
                            await flow.before_send()
                            await context.write(message)
                except (asyncio.CancelledError, Fail):
                    raise
                except Exception as exc:
                    raise self._tool_failed(bound, exc) from None
        finally:
            _current.reset(token)
            self._leave(session)

    async def CreateSession(
        self, request: pb.CreateSessionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CreateSessionResponse:
        try:
            bound = self._tool(request.tool) if request.tool else None
            session = self._new_session(bound)
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
        return pb.CloseSessionResponse(closed=await self.store.close(request.session_id))

    async def ListTools(
        self, request: pb.ListToolsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListToolsResponse:
        return self._list_tools


def _consume(task: asyncio.Future[Any]) -> None:
    # Outcomes are kept for retries; mark failures as seen so asyncio does not log them.
    if not task.cancelled():
        task.exception()


async def _pump(
    requests: AsyncIterator[pb.StreamCallRequest], flow: _Flow, main: asyncio.Task[Any]
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


async def _drain(inputs: asyncio.Queue[Any]) -> AsyncIterator[Any]:
    while True:
        item = await inputs.get()
        if item is _END:
            return
        yield item


def _describe(bound: BoundTool) -> pb.Tool:
    spec = bound.spec
    tool = pb.Tool(
        name=spec.name,
        capability=spec.capability,
        description=spec.description,
        tags=spec.tags,
        version=spec.version or "",
        streaming=spec.streaming,
        session_required=bound.requires_session,
        stateful=spec.stateful,
    )
    tool.parameters_schema.update(bound.schema)
    return tool
