"""One runner for every tool call. Whichever front end received a call (a unary ``Call``, a
call on an ``Exchange`` stream, a ``StreamCall``, the in-memory endpoint of
``sessionmesh.testing``), once admitted (``Dispatcher.plan``) it runs here: it waits for its
turn in its session, runs the tool under its timeout with its dependencies injected, records
the outcome (the durable save, the call id's memory) and writes the answer into the
adapter's message, or a stream's chunks into the adapter's :class:`Sink`. Adapters only
translate messages; what a call does is decided once, here.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from typing import TYPE_CHECKING, Any, Protocol

from sessionmesh import tracing
from sessionmesh.core._deadline import DEADLINE, tightened
from sessionmesh.core._tasks import Tasks
from sessionmesh.server._dispatch import Dispatcher, Plan
from sessionmesh.server._durable import Replayed, gone
from sessionmesh.server._errors import Fail, not_json, session_closed
from sessionmesh.server._observe import Counted, observing, refused
from sessionmesh.server._recall import Remembered
from sessionmesh.server._session import CLOSED_UNDER_CALL, Session, _current
from sessionmesh.wire.codec import NotJsonLike, set_value
from sessionmesh.wire.names import short
from sessionmesh.wire.reasons import Reason

if TYPE_CHECKING:
    from contextlib import AbstractAsyncContextManager, AbstractContextManager
    from contextvars import Token
    from types import TracebackType

    from google.protobuf.struct_pb2 import Value

    from sessionmesh.server._tool import BoundTool
    from sessionmesh.v1 import session_service_pb2 as pb

log = logging.getLogger("sessionmesh.agent")


class Sink(Protocol):
    """Where a stream's chunks go: the adapter's writes, with its flow control."""

    async def put(self, item: Any) -> None:
        """Send one chunk, a JSON-ready value (NotJsonLike if it has no JSON form: then
        nothing is sent); wait while the receiver has no room for it."""

    async def flush(self) -> BaseException | None:
        """Wait until every chunk put is out; why they could not all go out, or None.
        Never raises: it runs on the way out of a stream that may be failing already."""


class _Running:
    """A call in its turn, with its session as the current one and the tool's dependencies
    injected, for as long as the tool runs; counted, and (when on) traced and measured.
    Every tool run goes through it: unary calls, streams, the memory transport."""

    __slots__ = ("deadline_token", "limit", "plan", "runner", "scope", "token", "watch")

    def __init__(self, runner: Runner, plan: Plan, limit: float | None) -> None:
        self.runner = runner
        self.plan = plan
        self.limit = limit  # the tool's own timeout or stream_timeout

    async def __aenter__(self) -> Counted | None:
        runner = self.runner
        runner.calls_served += 1
        plan = self.plan
        self.watch = watch = runner.observed(plan)
        counted = watch.__enter__() if watch is not None else None
        self.scope: AbstractAsyncContextManager[None] | None = None
        try:
            turn = plan.turn
            if turn is not None:
                session = turn.enter_now() or await turn.__aenter__()
                if session.closed:
                    turn.leave()
                    raise gone(session)
            self.token: Token[Session | None] = _current.set(plan.session)
            deadline = tightened(plan.deadline, self.limit)
            self.deadline_token = DEADLINE.set(deadline) if deadline is not None else None
            if plan.bound.dependencies:
                try:
                    self.scope = self.runner.injector.scope(plan.bound, plan.session, plan.kwargs)
                    await self.scope.__aenter__()
                except BaseException:
                    self._leave()
                    raise
        except BaseException as exc:
            if watch is not None:
                watch.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return counted

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        watch = self.watch
        try:
            try:
                if self.scope is not None:
                    await self.scope.__aexit__(et, ev, tb)
            finally:
                self._leave()
            if isinstance(ev, asyncio.CancelledError) and ev.args == (CLOSED_UNDER_CALL,):
                # Not the caller going away: the session closed under the call. Say so.
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
                session = self.plan.session
                assert session is not None
                raise session_closed(session.id) from None
        except BaseException as raised:  # what the caller is told, not what the tool raised
            if watch is not None:
                watch.__exit__(type(raised), raised, raised.__traceback__)
            raise
        if watch is not None:
            watch.__exit__(et, ev, tb)

    def _leave(self) -> None:
        _current.reset(self.token)
        if self.deadline_token is not None:
            DEADLINE.reset(self.deadline_token)
        if self.plan.turn is not None:
            self.plan.turn.leave()


class Runner(Dispatcher):
    """The dispatcher's admission (``plan``) and the running of what it admits: the one
    object every adapter holds."""

    def __init__(self, **settings: Any) -> None:
        super().__init__(**settings)
        #: Calls with a call id run in tasks of their own, outliving their RPC: stop() ends them.
        self._detached = Tasks(f"agent {self.agent_name}'s calls", log, expected=(Fail,))

    def plan(
        self, request: pb.CallRequest, session_id: str, create: bool, principal: str = ""
    ) -> Plan:
        """Admit a call (``Dispatcher.plan``); one refused is counted and traced as well,
        under its tool's name (or "unknown": a label never grows with what callers send)."""
        try:
            plan = super().plan(request, session_id, create, principal)
        except Fail as fail:
            tracer = tracing.tracer()
            if self.metrics is not None or tracer is not None:
                known = self.tools.get(request.tool)
                label, asked = (known.spec.name, request.tool) if known else ("unknown",) * 2
                instance = self.store.instance_id
                refused(self.metrics, tracer, label, asked, fail, self.agent_name, instance)
            raise
        return plan

    async def answer(self, plan: Plan, out: Value) -> None:
        """Run a call and write its result into ``out`` (the adapter's answer); failures
        raise :class:`Fail`."""
        fill(out, plan.bound, await self.execute(plan))

    async def stream(self, plan: Plan, sink: Sink) -> None:
        """Run a streaming call in its turn, each chunk put into ``sink``. A durable
        session's state is saved when the stream ends (whether the tool returned or raised)
        and rolled back when it is cut off or refused. Failures raise :class:`Fail`."""
        bound = plan.bound
        stream_timeout = bound.spec.options.stream_timeout
        async with _Running(self, plan, stream_timeout) as counted:
            try:
                async with asyncio.timeout(stream_timeout):
                    rich = bound.result
                    chunks = bound.iterate(plan.kwargs)
                    try:
                        async for item in chunks:
                            try:
                                await sink.put(item if rich is None else rich.jsonable(item))
                            except NotJsonLike as exc:
                                raise not_json(bound.spec.name, "yielded", exc) from None
                            if counted is not None:
                                counted.chunks += 1
                    finally:
                        await chunks.aclose()
                        # What the tool yielded goes out before its end, or its failure.
                        failed = await sink.flush()
                    if failed is not None:
                        raise failed
            except (asyncio.CancelledError, Fail):
                self._unsaved(plan)  # cut off or refused: as if it never ran
                raise
            except Exception as exc:
                failure = self.tool_failed(plan, exc)
                await self._saved(plan)
                raise failure from None
            await self._saved(plan)

    def _remember(self, plan: Plan, outcome: asyncio.Future[Any]) -> None:
        # A retry of a call that opened its session comes again without a session id.
        in_session = plan.session is not None and not plan.created
        key = plan.session.id if in_session and plan.session is not None else ""
        self.recall.put(key, plan.call_id, Remembered(plan.new_id, outcome))

    def tool_failed(self, plan: Plan, exc: BaseException) -> Fail:
        """How a tool's exception reaches the caller; the agent's log hears of it too."""
        if isinstance(exc, Fail):
            return exc
        bound = plan.bound
        where = (
            f"in session {short(plan.session.id)}" if plan.session is not None else "(no session)"
        )
        who = f", caller {plan.principal}" if plan.principal else ""
        if isinstance(exc, TimeoutError):
            options = bound.spec.options
            name, limit = (
                ("stream_timeout", options.stream_timeout)
                if options.streaming
                else ("timeout", options.timeout)
            )
            what = (
                f"ran past its {name} of {limit:g} s (@mesh.tool({name}=...))"
                if limit is not None
                else "raised TimeoutError"
            )
            log.warning("tool %s %s %s%s", bound.spec.name, what, where, who)
            return Fail(
                Reason.TOOL_TIMEOUT,
                f"tool {bound.spec.name!r} {what}",
                {"type": "TimeoutError", "message": str(exc)},
            )
        kind = type(exc).__name__
        log.warning("tool %s raised %s %s%s", bound.spec.name, kind, where, who, exc_info=exc)
        return Fail(
            Reason.TOOL_FAILED,
            f"tool {bound.spec.name!r} raised {kind}: {exc}",
            {"type": kind, "message": str(exc)},
            debug="".join(traceback.format_exception(exc)) if self.debug else "",
        )

    def observed(self, plan: Plan) -> AbstractContextManager[Counted] | None:
        """The span and metrics of one tool run; None (nothing to do) when both are off."""
        metrics, tracer = self.metrics, tracing.tracer()
        if metrics is None and tracer is None:
            return None
        return observing(plan, metrics, tracer, self.agent_name, self.store.instance_id)

    async def _run(self, plan: Plan) -> Any:
        bound = plan.bound
        async with _Running(self, plan, bound.spec.options.timeout):
            session = plan.session
            if session is not None and session.durable is not None:
                return await self._run_durable(plan, session)
            timeout = bound.spec.options.timeout
            try:
                if timeout is None:
                    return await bound.invoke(plan.kwargs)
                async with asyncio.timeout(timeout):
                    return await bound.invoke(plan.kwargs)
            except Exception as exc:
                raise self.tool_failed(plan, exc) from None

    async def _run_durable(self, plan: Plan, session: Session) -> Any:
        """Run in a durable session (in its turn): a call that ran before a takeover gets
        its saved outcome; otherwise the tool runs and the session is saved before the
        answer, whether the tool returned or raised."""
        durability = self.durability
        assert durability is not None
        if plan.call_id:
            replayed = durability.replay(session, plan.call_id)
            if replayed is not None:
                return replayed
        bound = plan.bound
        try:
            async with asyncio.timeout(bound.spec.options.timeout):
                result = await bound.invoke(plan.kwargs)
        except asyncio.CancelledError:
            durability.revert(session)  # unanswered, unsaved: as if it never ran
            raise
        except Exception as exc:
            failure = self.tool_failed(plan, exc)
            if session._thread is not None:
                # A thread that timed out still writes the state: save what it leaves.
                await session._thread.wait()
            await durability.save(session, plan.call_id, failure)
            raise failure from None
        await durability.save(session, plan.call_id, result, bound)
        return result

    async def _saved(self, plan: Plan) -> None:
        """After a stream in a durable session: save its state before the stream ends."""
        session = plan.session
        if session is not None and session.durable is not None and self.durability is not None:
            await self.durability.save(session)

    def _unsaved(self, plan: Plan) -> None:
        """A stream in a durable session ended without its answer: back to the saved state."""
        session = plan.session
        if session is not None and session.durable is not None and self.durability is not None:
            self.durability.revert(session)

    async def stop(self) -> None:
        """Cancel the calls still running in tasks of their own (their callers are gone,
        or the agent's grace period is over) and wait until they have ended."""
        await self._detached.aclose()

    def _forget_unsaved(self, plan: Plan, done: asyncio.Future[Any]) -> None:
        """A durable call whose save failed (store down, or this copy was stale) changed
        nothing: its retry must run it again, not be told the failure again."""
        if done.cancelled():
            return
        failure = done.exception()
        if isinstance(failure, Fail) and failure.reason in _UNSAVED:
            key = plan.session.id if plan.session is not None and not plan.created else ""
            self.recall.forget(key, plan.call_id)

    async def execute(self, plan: Plan) -> Any:
        """The tool's result (a Python value); each adapter writes it straight into its
        answer. Failures raise :class:`Fail`."""
        if plan.earlier is not None:
            return await asyncio.shield(plan.earlier)
        session = plan.session
        if not plan.call_id or (
            # A durable session keeps its calls' outcomes with its state: a retry finds
            # the outcome there, in its turn after the first run; a call whose caller went
            # away is rolled back with the session's state, and runs when retried.
            session is not None and session.durable is not None and not plan.created
        ):
            try:
                return await self._run(plan)
            except asyncio.CancelledError:
                if plan.created and plan.session is not None:
                    # Its id travels with the answer, which will never be sent: nobody
                    # can ever use or close this session, so it goes now, not at its TTL.
                    self.store.close_soon(plan.session.id, "its opening call was cancelled")
                raise
        # With a call id the tool must run once even if the caller goes away (its connection
        # dropped): it runs in its own task and a retry awaits the same outcome.
        task = self._detached.start(self._run(plan))
        if session is not None and session.durable is not None:
            task.add_done_callback(lambda done: self._forget_unsaved(plan, done))
        self._remember(plan, task)
        return await asyncio.shield(task)


#: The failures of a durable call that mean it changed nothing.

_UNSAVED = frozenset({Reason.SESSION_STORE_UNAVAILABLE, Reason.SESSION_ELSEWHERE})


def fill(out: Value, bound: BoundTool, result: Any, verb: str = "returned") -> None:
    """Write a tool's result (or chunk) into ``out``; one the wire cannot carry is the
    call's failure (TOOL_FAILED), never a broken answer."""
    if type(result) is Replayed:
        out.CopyFrom(result.value)
        return
    try:
        if bound.result is not None:  # a dataclass, a model, a date...: as JSON first
            result = bound.result.jsonable(result)
        set_value(out, result)
    except NotJsonLike as exc:
        raise not_json(bound.spec.name, verb, exc) from None
