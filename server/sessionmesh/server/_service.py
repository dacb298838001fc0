"""The SessionService RPCs: thin adapters that move calls between gRPC and the dispatcher."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

import grpc

from sessionmesh import tracing
from sessionmesh.server._dispatch import Dispatcher, Plan, fill
from sessionmesh.server._eager import Eager
from sessionmesh.server._errors import Fail, invalid_arguments, invalid_stream, not_json
from sessionmesh.server._handlers import Undecodable
from sessionmesh.server._security import Authenticator
from sessionmesh.server._session import SessionNotFoundError
from sessionmesh.server._streaming import END_MESSAGE, HALF_CLOSE_WAIT, Batcher, Flow, pump
from sessionmesh.v1 import session_service_pb2 as pb
from sessionmesh.v1 import session_service_pb2_grpc as pb_grpc
from sessionmesh.wire.codec import NotJsonLike, set_value
from sessionmesh.wire.keys import (
    EXCHANGE_BATCH_KEY,
    SESSION_CREATE_KEY,
    SESSION_ID_KEY,
    STREAM_WINDOW_KEY,
)
from sessionmesh.wire.limits import DEFAULT_MAX_CALLS_PER_STREAM
from sessionmesh.wire.names import is_durable, short
from sessionmesh.wire.outbox import take_batch
from sessionmesh.wire.reasons import Reason
from sessionmesh.wire.status import Code
from sessionmesh.wire.tasks import pulse

log = logging.getLogger("sessionmesh.agent")

#: Answers in one message, at most, to a client that takes batches.
_MAX_BATCH = 64
#: Answers waiting for the task that writes, at most: then the one answering waits too (and
#: the reader reads no more calls), so a client that does not read cannot pile them up.
_MAX_QUEUED = 256

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

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
    """The SessionService RPCs as thin adapters over one :class:`Dispatcher`."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        auth: Authenticator | None = None,
        max_calls_per_stream: int = DEFAULT_MAX_CALLS_PER_STREAM,
    ) -> None:
        self.dispatcher = dispatcher
        self.max_calls_per_stream = max_calls_per_stream
        self.auth = auth if auth is not None else Authenticator()
        self.store = dispatcher.store
        self._streams: set[_Stream] = set()
        self.tool_descriptions = [_describe(b) for b in dispatcher.bound_tools]
        self._list_tools = pb.ListToolsResponse(
            agent_name=dispatcher.agent_name,
            instance_id=self.store.instance_id,
            tools=self.tool_descriptions,
        )

    @property
    def draining(self) -> bool:
        return self.dispatcher.draining

    # -- RPCs ---------------------------------------------------------------------------------

    async def Call(
        self, request: pb.CallRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CallResponse:
        try:
            principal = await self.auth.principal(context) if self.auth.on else ""
            plan = self.dispatcher.plan(request, *_metadata(context), principal)
            plan.expires_in(context.time_remaining())
            if tracing.tracer() is not None:
                plan.carrier = _trace_headers(context)
            try:
                if plan.new_id:
                    await context.send_initial_metadata(((SESSION_ID_KEY, plan.new_id),))
                response = pb.CallResponse()
                fill(response.result, plan.bound, await self.dispatcher.execute(plan))
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
        principal = await self.auth.caller(context)
        stream = _Stream(request_iterator, context, principal)
        headers = context.invocation_metadata() or ()
        if any(k == EXCHANGE_BATCH_KEY and v == "1" for k, v in headers):
            # This client takes several answers to a message: tell it that calls may come so.
            stream.batches = True
            await context.send_initial_metadata(((EXCHANGE_BATCH_KEY, "1"),))
        # Reading runs in tasks of its own so that draining can stop it (the stream is
        # long-lived) and still let the calls it started finish and answer.
        stream.reader = asyncio.get_running_loop().create_task(self._serve(stream))
        self._streams.add(stream)
        failure: Fail | None = None
        try:
            try:
                await stream.ended
            except Fail as fail:
                failure = fail  # an undecodable message: the stream cannot go on
            if stream.tasks:  # half-closed, draining or failed: finish what was sent, answered
                await asyncio.wait(list(stream.tasks))
            if failure is not None:  # and only then end the stream, always with a status
                await context.abort_with_status(failure.status())
        finally:
            self._streams.discard(stream)
            stream.stopping = True
            stream.reader.cancel()
            loop = asyncio.get_running_loop()
            for task in list(stream.tasks):
                loop.call_soon(task.cancel)

    async def _serve(self, stream: _Stream) -> None:
        """Read the stream and run its calls. A call that ends without waiting (most do) is
        answered from here, before the next message is read, as a plain echo server would.
        One that waits keeps this task to its end (its turn, timeouts and task groups name
        this task) and a new task takes over the reading."""
        running = stream.unanswered
        try:
            backlog = stream.backlog
            while True:
                if backlog:  # the rest of a batch: received, so answered even when draining
                    message = backlog.popleft()
                else:
                    if stream.queued:  # answers held for a batch: out before waiting to read
                        await stream.flush()
                    if stream.stopping:  # draining: read no more
                        stream.end()
                        return
                    stream.reading = True
                    try:
                        message = await anext(stream.requests)
                    except StopAsyncIteration:
                        stream.end()  # the client half-closed
                        return
                    finally:
                        stream.reading = False
                    if isinstance(message, Undecodable):
                        raise message.fail()  # the stream cannot go on: Exchange ends it
                if message.more:  # calls in the same message: next, in order
                    backlog.extendleft(reversed(message.more))
                if message.cancel:
                    task = running.get(message.id)
                    if task is not None:
                        # Soon, not now: a call cancelled in the middle of this step would
                        # miss the code that gives up its place in the session's line.
                        asyncio.get_running_loop().call_soon(task.cancel)
                    continue
                answer = pb.ExchangeResponse(id=message.id)
                refusal = self._refusal(message.id, running)
                if refusal is not None:
                    _failed(answer, refusal)
                else:
                    # The caller's deadline counts from arrival; it is armed only if the
                    # call waits (one that ends in its first step cannot overrun it).
                    until = (
                        asyncio.get_running_loop().time() + message.timeout.ToNanoseconds() / 1e9
                        if message.HasField("timeout")
                        else None
                    )
                    try:
                        call = Eager(self._run(message, answer, stream.principal, until))
                    except asyncio.CancelledError:  # its own: an earlier run's, cancelled
                        _failed(answer, Fail("", "Cancelled", code=Code.CANCELLED))
                    except Exception as exc:  # a fault of the agent's: this call's alone
                        _failed(answer, _internal(message, exc))
                    else:
                        if not call.done:
                            break  # it waits: this task is the call's from now on
                if backlog and stream.batches and len(stream.queued) < _MAX_BATCH:
                    stream.queued.append(answer)  # leaves with the answers to the batch's rest
                else:
                    await stream.send(answer)
        except asyncio.CancelledError:
            stream.end()  # draining, or the stream is over
            raise
        except Exception as exc:
            stream.end(exc)
            return
        me = asyncio.current_task()
        assert me is not None
        stream.reader = asyncio.get_running_loop().create_task(self._serve(stream))
        stream.add(message.id, me)
        try:
            deadline = asyncio.timeout_at(until)
            try:
                async with deadline:
                    await call
            except Exception as exc:
                if isinstance(exc, TimeoutError) and deadline.expired():
                    exc = Fail("", "Deadline Exceeded", code=Code.DEADLINE_EXCEEDED)
                _failed(answer, exc if isinstance(exc, Fail) else _internal(message, exc))
            stream.answering(message.id)
            await stream.send(answer)
        except Exception as exc:  # the answer could not be written: the stream is broken
            stream.end(exc)
        finally:
            stream.done(message.id, me)

    def _refusal(self, call_id: int, running: dict[int, asyncio.Task[None]]) -> Fail | None:
        """Why a stream cannot take call ``call_id`` (it then runs nothing), or None."""
        if len(running) >= self.max_calls_per_stream:
            # Each call in flight holds memory: one client cannot take it all.
            return Fail(
                Reason.TOO_MANY_CALLS,
                f"this Exchange stream has {len(running)} calls in flight, the agent's limit "
                "(max_calls_per_stream): wait for answers, or send more as unary Calls",
            )
        if call_id in running:
            # Its answer would be taken for the first one's.
            return invalid_stream(
                f"call id {call_id} is already in flight on this Exchange stream; ids must "
                "be unique among the calls not yet answered"
            )
        return None

    def drain(self) -> None:
        """Take no new sessions or calls: Exchange streams stop reading and end once the
        calls they carry are answered (the client then sees the stream end)."""
        self.dispatcher.draining = True
        for stream in list(self._streams):
            stream.stop_reading()

    async def _run(
        self,
        message: pb.ExchangeRequest,
        answer: pb.ExchangeResponse,
        principal: str,
        deadline: float | None,
    ) -> None:
        """Run one call of an Exchange stream and write its outcome into ``answer``."""
        try:
            plan = self.dispatcher.plan(
                message.call, message.session_id, message.create_session, principal
            )
            if message.metadata:
                plan.carrier = message.metadata
            if plan.new_id:
                answer.session_id = plan.new_id
            plan.deadline = deadline
            fill(answer.result, plan.bound, await self.dispatcher.execute(plan))
        except Fail as fail:
            _failed(answer, fail)  # `error` replaces result

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
            if isinstance(first, Undecodable):
                raise first.fail()
            if first.WhichOneof("kind") != "start":
                raise invalid_stream("the first message of a StreamCall must be 'start'")
            start = first.start
            principal = await self.auth.principal(context) if self.auth.on else ""
            plan = self.dispatcher.plan(start.call, *_metadata(context), principal)
            plan.expires_in(context.time_remaining())
            if tracing.tracer() is not None:
                plan.carrier = _trace_headers(context)
            abandon = plan.abandon
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
            pumping = asyncio.get_running_loop().create_task(pump(requests, flow, me))
            try:
                await self._stream(plan, flow, context)
            except asyncio.CancelledError:
                if flow.error is None:
                    raise
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
                pumping.cancel()
            raise
        if flow is not None and flow.window and pumping is not None:
            # Tell the client it is over and wait (briefly) for its half-close, so no credit
            # it is still sending races the end of the call.
            flow.finished = True
            with contextlib.suppress(Exception):
                await context.write(END_MESSAGE)
                await asyncio.wait_for(asyncio.shield(pumping), HALF_CLOSE_WAIT)
        if pumping is not None:
            pumping.cancel()
        if failure is not None:
            await context.abort_with_status(failure.status())

    async def _stream(
        self, plan: Plan, flow: Flow, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        bound = plan.bound
        stream_timeout = bound.spec.options.stream_timeout
        async with self.dispatcher.running(plan, stream_timeout) as counted:
            try:
                async with asyncio.timeout(stream_timeout):
                    write = context.write
                    rich = bound.result
                    chunks = bound.iterate(plan.kwargs)
                    batcher = Batcher(write, flow.max_batch) if flow.max_batch > 1 else None
                    try:
                        async for item in chunks:
                            if flow.window:
                                if flow.sent >= flow.allowed:
                                    await flow.credit()
                                flow.sent += 1
                            try:
                                if rich is not None:
                                    item = rich.jsonable(item)
                                if batcher is not None:
                                    await batcher.add(item)
                                else:
                                    message = pb.StreamCallResponse()
                                    set_value(message.chunk, item)
                                    await write(message)
                            except NotJsonLike as exc:
                                raise not_json(bound.spec.name, "yielded", exc) from None
                            if counted is not None:
                                counted.chunks += 1
                    finally:
                        await chunks.aclose()
                        if batcher is not None:
                            # What the tool yielded goes out before its end, or its failure.
                            await batcher.flush()
                    if batcher is not None and batcher.error is not None:
                        raise batcher.error
            except (asyncio.CancelledError, Fail):
                self.dispatcher.unsaved(plan)  # cut off or refused: as if it never ran
                raise
            except Exception as exc:
                failure = self.dispatcher.tool_failed(plan, exc)
                await self.dispatcher.saved(plan)
                raise failure from None
            await self.dispatcher.saved(plan)

    async def CreateSession(
        self, request: pb.CreateSessionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CreateSessionResponse:
        try:
            principal = await self.auth.principal(context) if self.auth.on else ""
            bound = self.dispatcher.tool(request.tool) if request.tool else None
            session = self.dispatcher.new_session(bound, principal)
            if self.dispatcher.durability is not None:
                try:  # answered only once it is in the store: it outlives this instance
                    await self.dispatcher.durability.save(session)
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
        durability = self.dispatcher.durability
        if durability is not None and is_durable(session_id) and session_id not in self.store:
            # Kept in the store and owned elsewhere (or by nobody now): closed there.
            try:
                closed = await durability.close_elsewhere(session_id, principal)
            except Fail as fail:
                await context.abort_with_status(fail.status())
                raise
            return pb.CloseSessionResponse(closed=closed)
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
            instance_id=self.store.instance_id, calls_served=self.dispatcher.calls_served
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


def _internal(message: pb.ExchangeRequest, exc: Exception) -> Fail:
    """A call that failed inside the agent, not in its tool: logged, and answered as such."""
    log.error("call of %r failed inside the agent", message.call.tool, exc_info=exc)
    return Fail(
        "",
        f"the agent failed on this call ({type(exc).__name__}: {exc}); it is logged there",
        code=Code.INTERNAL,
    )


def _failed(answer: pb.ExchangeResponse, fail: Fail) -> None:
    """Make ``answer`` say ``fail``."""
    answer.ClearField("result")
    error = answer.error
    error.code = fail.code
    error.message = fail.message
    error.details.extend(fail.details())


class _Stream:
    """One Exchange stream: the task reading it now, the calls not answered yet that wait
    in tasks of their own (the per-stream limit counts them; a cancel finds them) and those
    tasks until they end (the stream waits for them)."""

    __slots__ = (
        "backlog",
        "batches",
        "context",
        "ended",
        "principal",
        "queued",
        "reader",
        "reading",
        "requests",
        "room",
        "stopping",
        "tasks",
        "unanswered",
        "writing",
    )

    def __init__(
        self,
        requests: AsyncIterator[pb.ExchangeRequest],
        context: grpc.aio.ServicerContext[Any, Any],
        principal: str,
    ) -> None:
        self.requests = aiter(requests)
        self.context = context
        self.principal = principal
        #: The client takes several answers in one message (ExchangeResponse.more).
        self.batches = False
        #: Calls received in one message with others (ExchangeRequest.more), not run yet.
        self.backlog: collections.deque[pb.ExchangeRequest] = collections.deque()
        # One task writes at a time; answers handed over meanwhile wait here for it.
        self.writing = False
        self.queued: collections.deque[pb.ExchangeResponse] = collections.deque()
        self.room = asyncio.Event()  # pulsed as the queue drains: tasks wait on it for room
        self.reader: asyncio.Task[None] | None = None
        self.reading = False  # the reader waits for the next message
        self.stopping = False  # read no more (draining)
        #: Done when reading is over: the client half-closed, the agent drains, or (an
        #: exception) a message could not be read.
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.unanswered: dict[int, asyncio.Task[None]] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    def end(self, error: Exception | None = None) -> None:
        if self.ended.done():
            return
        if error is None:
            self.ended.set_result(None)
        else:
            self.ended.set_exception(error)

    def stop_reading(self) -> None:
        """Read no more. A reader waiting for a message stops now; one that is answering a
        call stops once the answer is written."""
        self.stopping = True
        if self.reading and self.reader is not None:
            self.reader.cancel()

    async def send(self, answer: pb.ExchangeResponse) -> None:
        """Write an answer. While another task writes, the answer waits for it and goes out
        after what it writes (with the others waiting, in one message when the client takes
        batches): under load a write costs once per batch, and nobody waits for a lock."""
        self.queued.append(answer)
        await self.flush()

    async def flush(self) -> None:
        """Write the answers waiting, unless another task is writing (it writes them)."""
        queued = self.queued
        if self.writing:
            while len(queued) >= _MAX_QUEUED and self.writing:  # bound what piles up
                await self.room.wait()
            return
        self.writing = True
        try:
            write = self.context.write
            while queued:
                if self.batches and len(queued) > 1:
                    batch = take_batch(queued, _MAX_BATCH)
                    answer = batch[0]
                    answer.more.extend(batch[1:])
                else:
                    answer = queued.popleft()
                pulse(self.room)
                await write(answer)
        finally:
            self.writing = False
            pulse(self.room)

    def add(self, call_id: int, task: asyncio.Task[None]) -> None:
        self.unanswered[call_id] = task
        self.tasks.add(task)

    def answering(self, call_id: int) -> None:
        """Its answer is being handed to the stream: the client may send its next call the
        moment it reads it, so it no longer counts against the limit."""
        self.unanswered.pop(call_id, None)

    def done(self, call_id: int, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if self.unanswered.get(call_id) is task:
            del self.unanswered[call_id]


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
