"""The SessionService servicer: sessions, dedup, ordering and tool invocation over gRPC."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import time
import traceback
from typing import TYPE_CHECKING, Any

import grpc

from sessionmesh.client._codec import NotJsonLike, from_struct, set_value
from sessionmesh.client._wire import (
    SESSION_CREATE_KEY,
    SESSION_ID_KEY,
    STREAM_WINDOW_KEY,
    Reason,
)
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
    short,
)
from sessionmesh.server._streaming import END_MESSAGE, HALF_CLOSE_WAIT, Flow, drain, pump
from sessionmesh.v1 import session_service_pb2 as pb
from sessionmesh.v1 import session_service_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from types import TracebackType

    from google.protobuf.struct_pb2 import Value

    from sessionmesh.server._inject import Injector
    from sessionmesh.server._tool import BoundTool

#: How many call ids of calls without a session (or that opened one) the agent remembers.
RECENT_CALLS = 10_000

Turn = asyncio.Future[None] | None


class _Plan:
    """A call ready to run: everything decided at arrival, before the first await, so that
    calls of one session keep their arrival order."""

    __slots__ = (
        "bound",
        "call_id",
        "created",
        "earlier",
        "entered",
        "kwargs",
        "new_id",
        "session",
        "turn",
    )

    def __init__(
        self,
        bound: BoundTool,
        session: Session | None,
        earlier: asyncio.Future[Any] | None,
        new_id: str,
        call_id: str,
    ) -> None:
        self.bound = bound
        self.session = session
        self.earlier = earlier
        self.new_id = new_id  # a session id to report to the caller: opened, or a replay's
        self.created = session is not None and new_id == session.id
        self.call_id = call_id
        self.kwargs: dict[str, Any] = {}
        self.turn: Turn = None
        self.entered = False

    def abandon(self) -> None:
        """Give up the call's place in line without running (it failed or was cancelled
        before its turn); a no-op once it has entered."""
        session = self.session
        if session is None or self.entered:
            return
        self.entered = True
        turn = self.turn
        if turn is None or (turn.done() and not turn.cancelled()):
            session.release()  # the turn was this call's: pass it on
        else:
            turn.cancel()


class _Turn:
    """A call's turn in its session, with the session as the current one and the tool's
    dependencies injected, for as long as the tool runs."""

    __slots__ = ("plan", "scope", "servicer", "token")

    def __init__(self, servicer: Servicer, plan: _Plan) -> None:
        self.servicer = servicer
        self.plan = plan

    async def __aenter__(self) -> None:
        plan = self.plan
        await self.servicer._enter(plan)
        self.token = _current.set(plan.session)
        try:
            self.scope = self.servicer.injector.scope(plan.bound, plan.session, plan.kwargs)
            await self.scope.__aenter__()
        except BaseException:
            self._leave()
            raise

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await self.scope.__aexit__(et, ev, tb)
        finally:
            self._leave()

    def _leave(self) -> None:
        _current.reset(self.token)
        self.servicer._leave(self.plan.session)


def _metadata(context: grpc.aio.ServicerContext[Any, Any]) -> tuple[str, bool]:
    session_id = ""
    create = False
    for key, value in context.invocation_metadata() or ():
        if key == SESSION_ID_KEY:
            session_id = str(value)
        elif key == SESSION_CREATE_KEY:
            create = True
    return session_id, create


class Servicer(pb_grpc.SessionServiceServicer):
    def __init__(
        self,
        *,
        agent_name: str,
        tools: dict[str, BoundTool],
        store: SessionStore,
        injector: Injector,
        debug: bool = False,
        locate: Callable[[str], str | None] | None = None,
    ) -> None:
        self.agent_name = agent_name
        self.tools = tools
        self.store = store
        self.injector = injector
        self.debug = debug
        self.locate = locate
        self.draining = False
        self._exchange_readers: set[asyncio.Task[None]] = set()
        self._recent: collections.OrderedDict[str, tuple[str, asyncio.Future[Any]]] = (
            collections.OrderedDict()
        )
        unique = {id(b): b for b in tools.values()}
        self.tool_descriptions = [_describe(b) for b in unique.values()]
        self._list_tools = pb.ListToolsResponse(
            agent_name=agent_name, instance_id=store.instance_id, tools=self.tool_descriptions
        )
        self._tool_names = sorted({b.spec.name for b in unique.values()})

    # -- deciding, at arrival -----------------------------------------------------------------

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

    def _plan(self, request: pb.CallRequest, session_id: str, create: bool) -> _Plan:
        """Find (or open) the call's session, find an earlier outcome of the same call id,
        bind the arguments and take the call's place in its session's line. Never awaits."""
        bound = self._tool(request.tool)
        call_id = request.call_id
        if session_id:
            try:
                session = self.store.get(session_id)
            except SessionNotFoundError:
                raise self._not_here(session_id) from None
            plan = _Plan(
                bound, session, session.remembered(call_id) if call_id else None, "", call_id
            )
        elif create:
            if call_id and call_id in self._recent:
                # A retry of a call that opened a session: the same session, the same outcome.
                sid, outcome = self._recent[call_id]
                return _Plan(bound, None, outcome, sid, call_id)
            # Bind first: a call that cannot run must not leave a session nobody knows of.
            kwargs = self._bind(bound, request, None)
            session = self._new_session(bound)
            plan = _Plan(bound, session, None, session.id, call_id)
            plan.kwargs = kwargs
            kwargs.update(dict.fromkeys(bound.session_params, session))
            plan.turn = session.enqueue()
            return plan
        elif bound.requires_session:
            raise Fail(
                grpc.StatusCode.FAILED_PRECONDITION,
                Reason.SESSION_REQUIRED,
                f"tool {bound.spec.name!r} needs a session: send '{SESSION_ID_KEY}: <id>' from "
                f"CreateSession, or '{SESSION_CREATE_KEY}: 1' to open one with this call",
            )
        else:
            earlier = self._recent[call_id][1] if call_id and call_id in self._recent else None
            plan = _Plan(bound, None, earlier, "", call_id)
        if plan.earlier is None:
            plan.kwargs = self._bind(bound, request, plan.session)
            if plan.session is not None:
                plan.turn = plan.session.enqueue()
        return plan

    def _not_here(self, session_id: str) -> Fail:
        """A session this instance does not have: elsewhere (name the owner) or nowhere."""
        owner = session_id.partition(".")[0]
        if owner != self.store.instance_id and self.locate is not None:
            endpoint = self.locate(owner)
            if endpoint is not None:
                return Fail(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    Reason.SESSION_ELSEWHERE,
                    f"session {session_id[:14]}... lives on instance {owner} at {endpoint}; "
                    "send its calls there (a session never moves)",
                    {"session_id": session_id, "owner_instance": owner, "owner_endpoint": endpoint},
                )
        return session_not_found(session_id)

    def _bind(
        self, bound: BoundTool, request: pb.CallRequest, session: Session | None
    ) -> dict[str, Any]:
        try:
            return bound.bind(from_struct(request.arguments), session)
        except ArgumentError as exc:
            raise invalid_arguments(exc.field, str(exc)) from None

    def _remember(self, plan: _Plan, outcome: asyncio.Future[Any]) -> None:
        if plan.session is not None:
            plan.session.remember(plan.call_id, outcome)
        if plan.session is None or plan.created:
            self._recent[plan.call_id] = (plan.new_id, outcome)
            if len(self._recent) > RECENT_CALLS:
                self._recent.popitem(last=False)

    # -- running ------------------------------------------------------------------------------

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

    async def _enter(self, plan: _Plan) -> None:
        session = plan.session
        if session is None:
            return
        try:
            if plan.turn is not None:
                await plan.turn
        except BaseException:
            plan.abandon()
            raise
        plan.entered = True
        if session.closed:
            session.release()
            raise session_not_found(session.id)
        session.active += 1

    @staticmethod
    def _leave(session: Session | None) -> None:
        if session is not None:
            session.active -= 1
            session.last_used = time.monotonic()
            session.release()

    async def _run(self, plan: _Plan) -> Any:
        bound = plan.bound
        async with _Turn(self, plan):
            try:
                async with asyncio.timeout(bound.spec.timeout):
                    return await bound.invoke(plan.kwargs)
            except Exception as exc:
                raise self._tool_failed(bound, exc) from None

    async def _execute(self, plan: _Plan) -> Any:
        """The tool's result (a Python value); each RPC writes it straight into its answer."""
        if plan.earlier is not None:
            return await asyncio.shield(plan.earlier)
        if not plan.call_id:
            return await self._run(plan)
        # With a call id the tool must run once even if the caller goes away (its connection
        # dropped): it runs in its own task and a retry awaits the same outcome.
        task = asyncio.get_running_loop().create_task(self._run(plan))
        task.add_done_callback(_consume)
        self._remember(plan, task)
        return await asyncio.shield(task)

    # -- RPCs ---------------------------------------------------------------------------------

    async def Call(
        self, request: pb.CallRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CallResponse:
        try:
            plan = self._plan(request, *_metadata(context))
            try:
                if plan.new_id:
                    await context.send_initial_metadata(((SESSION_ID_KEY, plan.new_id),))
                response = pb.CallResponse()
                _fill(response.result, plan.bound, await self._execute(plan))
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
        running: dict[int, asyncio.Task[None]] = {}
        loop = asyncio.get_running_loop()
        # Reading runs in its own task so that draining can stop it (the stream is long-lived)
        # and still let the calls it started finish and answer.
        reader = loop.create_task(self._read_exchange(request_iterator, context, running))
        self._exchange_readers.add(reader)
        try:
            try:
                await reader
            except asyncio.CancelledError:
                me = asyncio.current_task()
                if me is not None and me.cancelling():
                    raise  # the RPC itself is cancelled: the client is gone
            if running:  # half-closed, or draining: finish what was sent
                await asyncio.wait(list(running.values()))
        finally:
            self._exchange_readers.discard(reader)
            reader.cancel()
            for task in list(running.values()):
                loop.call_soon(task.cancel)

    async def _read_exchange(
        self,
        request_iterator: AsyncIterator[pb.ExchangeRequest],
        context: grpc.aio.ServicerContext[Any, Any],
        running: dict[int, asyncio.Task[None]],
    ) -> None:
        write = asyncio.Lock()  # one write at a time on the stream
        loop = asyncio.get_running_loop()
        async for message in request_iterator:
            if message.cancel:
                task = running.get(message.id)
                if task is not None:
                    # Soon, not now: a task cancelled before its first step would skip
                    # the code that gives up its place in the session's line.
                    loop.call_soon(task.cancel)
                continue
            answer = pb.ExchangeResponse(id=message.id)
            try:
                plan = self._plan(message.call, message.session_id, message.create_session)
            except Fail as fail:
                task = loop.create_task(_send_failure(answer, fail, context, write))
            else:
                task = loop.create_task(self._exchange(message, plan, answer, context, write))
            running[message.id] = task
            task.add_done_callback(functools.partial(_forget, running, message.id))

    def drain(self) -> None:
        """Take no new sessions or calls: Exchange streams stop reading and end once the
        calls they carry are answered (the client then sees the stream end)."""
        self.draining = True
        for reader in list(self._exchange_readers):
            reader.cancel()

    async def _exchange(
        self,
        message: pb.ExchangeRequest,
        plan: _Plan,
        answer: pb.ExchangeResponse,
        context: grpc.aio.ServicerContext[Any, Any],
        write: asyncio.Lock,
    ) -> None:
        if plan.new_id:
            answer.session_id = plan.new_id
        try:
            if message.HasField("timeout"):
                try:
                    async with asyncio.timeout(message.timeout.ToNanoseconds() / 1e9):
                        result = await self._execute(plan)
                except TimeoutError:
                    raise Fail(grpc.StatusCode.DEADLINE_EXCEEDED, "", "Deadline Exceeded") from None
            else:
                result = await self._execute(plan)
            _fill(answer.result, plan.bound, result)
        except Fail as fail:
            await _send_failure(answer, fail, context, write)  # `error` replaces any result
            return
        async with write:
            await context.write(answer)

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
        try:
            try:
                first = await anext(requests)
            except StopAsyncIteration:
                raise invalid_stream("the stream ended before its first message (start)") from None
            if first.WhichOneof("kind") != "start":
                raise invalid_stream("the first message of a StreamCall must be 'start'")
            start = first.start
            plan = self._plan(start.call, *_metadata(context))
            abandon = plan.abandon
            bound = plan.bound
            flow = Flow(min(start.window, bound.spec.buffer_size) if start.window else 0)
            headers = []
            if plan.new_id:
                headers.append((SESSION_ID_KEY, plan.new_id))
            if flow.window:
                headers.append((STREAM_WINDOW_KEY, str(flow.window)))
            if headers:
                await context.send_initial_metadata(tuple(headers))
            if bound.input_param:
                flow.inputs = asyncio.Queue(maxsize=bound.spec.buffer_size)
                plan.kwargs[bound.input_param] = drain(flow.inputs)
            me = asyncio.current_task()
            assert me is not None
            pumping = asyncio.get_running_loop().create_task(pump(requests, flow, me))
            try:
                await self._stream(plan, flow, context)
            except asyncio.CancelledError:
                if flow.error is None:
                    raise
                raise flow.error from None
        except Fail as fail:
            failure = fail
            if abandon is not None:
                abandon()
        except BaseException:
            if abandon is not None:
                abandon()
            if pumping is not None:
                pumping.cancel()
            raise
        if flow is not None and flow.window and pumping is not None:
            # Tell the client it is over and wait (briefly) for its half-close, so no credit
            # it is still sending races the end of the call.
            flow.finished = True
            flow.discard_inputs()
            with contextlib.suppress(Exception):
                await context.write(END_MESSAGE)
                await asyncio.wait_for(asyncio.shield(pumping), HALF_CLOSE_WAIT)
        if pumping is not None:
            pumping.cancel()
        if failure is not None:
            await context.abort_with_status(failure.status())

    async def _stream(
        self, plan: _Plan, flow: Flow, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        bound = plan.bound
        async with _Turn(self, plan):
            try:
                async with asyncio.timeout(bound.spec.stream_timeout):
                    write = context.write
                    chunks = bound.iterate(plan.kwargs)
                    try:
                        async for item in chunks:
                            message = pb.StreamCallResponse()
                            try:
                                set_value(message.chunk, item)
                            except NotJsonLike as exc:
                                raise not_json(bound.spec.name, "yielded", exc) from None
                            if flow.window:
                                if flow.sent >= flow.allowed:
                                    await flow.credit()
                                flow.sent += 1
                            await write(message)
                    finally:
                        await chunks.aclose()
            except (asyncio.CancelledError, Fail):
                raise
            except Exception as exc:
                raise self._tool_failed(bound, exc) from None

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

    async def ListSessions(
        self, request: pb.ListSessionsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListSessionsResponse:
        response = pb.ListSessionsResponse(instance_id=self.store.instance_id)
        now = time.monotonic()
        for session in self.store.sessions():
            info = response.sessions.add(
                short_id=short(session.id), active=session.active > 0, waiting=session.waiting
            )
            info.idle.FromNanoseconds(0 if session.active else int((now - session.last_used) * 1e9))
            info.idle_timeout.FromNanoseconds(int(session.ttl * 1e9))
        return response

    async def ListTools(
        self, request: pb.ListToolsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListToolsResponse:
        return self._list_tools


async def _send_failure(
    answer: pb.ExchangeResponse,
    fail: Fail,
    context: grpc.aio.ServicerContext[Any, Any],
    write: asyncio.Lock,
) -> None:
    error = answer.error
    error.code = fail.code.value[0]
    error.message = fail.message
    error.details.extend(fail.details())
    async with write:
        await context.write(answer)


def _fill(out: Value, bound: BoundTool, result: Any) -> None:
    try:
        set_value(out, result)
    except NotJsonLike as exc:
        raise not_json(bound.spec.name, "returned", exc) from None


def _forget(running: dict[int, asyncio.Task[None]], call_id: int, _: object) -> None:
    running.pop(call_id, None)


def _consume(task: asyncio.Future[Any]) -> None:
    # Outcomes are kept for retries; mark failures as seen so asyncio does not log them.
    if not task.cancelled():
        task.exception()


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
