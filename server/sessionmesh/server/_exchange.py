"""The Exchange RPC: many calls multiplexed on one long-lived stream per connection, each
answered by id. A call that never waits is run and answered by the task reading the stream,
before it reads the next message; one that waits keeps that task and a new one reads on.
Answers handed over while a write is in flight leave together with the next write."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from sessionmesh.core._outbox import take_batch
from sessionmesh.core._tasks import pulse
from sessionmesh.server._eager import Eager
from sessionmesh.server._errors import Fail, invalid_stream
from sessionmesh.server._handlers import Undecodable
from sessionmesh.v1 import session_service_pb2 as pb
from sessionmesh.wire.keys import EXCHANGE_BATCH_KEY
from sessionmesh.wire.reasons import Reason
from sessionmesh.wire.status import Code

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    import grpc

    from sessionmesh.server._runner import Runner

log = logging.getLogger("sessionmesh.agent")

#: Answers in one message, at most, to a client that takes batches.
_MAX_BATCH = 64
#: Answers waiting for the task that writes, at most: then the one answering waits too (and
#: the reader reads no more calls), so a client that does not read cannot pile them up.
_MAX_QUEUED = 256


class Exchanges:
    """The agent's open Exchange streams, served over one runner."""

    def __init__(self, runner: Runner, max_calls_per_stream: int) -> None:
        self.runner = runner
        self.max_calls_per_stream = max_calls_per_stream
        self._streams: set[_Stream] = set()

    def __len__(self) -> int:
        return len(self._streams)

    def stop_reading(self) -> None:
        """Draining: every stream reads no more and ends once its calls are answered."""
        for stream in list(self._streams):
            stream.stop_reading()

    async def serve(
        self,
        request_iterator: AsyncIterator[pb.ExchangeRequest],
        context: grpc.aio.ServicerContext[Any, Any],
        principal: str,
    ) -> None:
        """Serve one Exchange stream until the client half-closes it, the agent drains, or
        a message cannot be read; its calls are answered first."""
        stream = _Stream(request_iterator, context, principal)
        headers = context.invocation_metadata() or ()
        if any(k == EXCHANGE_BATCH_KEY and v == "1" for k, v in headers):
            # This client takes several answers to a message: tell it that calls may come so.
            stream.batches = True
            await context.send_initial_metadata(((EXCHANGE_BATCH_KEY, "1"),))
        # Reading runs in tasks of its own so that draining can stop it (the stream is
        # long-lived) and still let the calls it started finish and answer.
        # A bare task, owned by this handler: it ends it below, and waits for the calls it
        # started (stream.tasks). Reading hands over from task to task (a call that waits
        # keeps the reader's task), so no group could hold them for the stream's lifetime.
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
            if stream.stopping and failure is None:
                # Draining: every call read is answered; tell the client that the rest
                # were never read (it sends them to another replica). A client gone
                # meanwhile needs no telling.
                with contextlib.suppress(Exception):
                    await stream.send(pb.ExchangeResponse(drained=True))
                    # The client ends the stream when it hears that. Ended from here, its
                    # writes still on the way would fail, and a failed write tells it
                    # nothing of what was read: so it ends, or the wait does.
                    ended = asyncio.get_running_loop().create_future()
                    # (the stub wants a class of its own for the callback)
                    context.add_done_callback(lambda _: _resolve(ended))  # type: ignore[arg-type]
                    await asyncio.wait_for(ended, _DRAINED_WAIT)
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
        # The reading goes on in a new task (the hot path's one hop, only for a call that
        # waits); this one is now the call's, in stream.tasks until it has answered.
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

    async def _run(
        self,
        message: pb.ExchangeRequest,
        answer: pb.ExchangeResponse,
        principal: str,
        deadline: float | None,
    ) -> None:
        """Run one call of an Exchange stream and write its outcome into ``answer``."""
        try:
            plan = self.runner.plan(
                message.call, message.session_id, message.create_session, principal
            )
            if message.metadata:
                plan.carrier = message.metadata
            if plan.new_id:
                answer.session_id = plan.new_id
            plan.deadline = deadline
            await self.runner.answer(plan, answer.result)
        except Fail as fail:
            _failed(answer, fail)  # `error` replaces result


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


#: How long a drained stream waits for its client to end it.
_DRAINED_WAIT = 2.0


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


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
