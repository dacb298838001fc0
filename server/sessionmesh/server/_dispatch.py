"""The transport-neutral heart of an agent: plan a call at arrival, run it in its session's
turn, remember its outcome for retries. The RPC adapters (``_service.py``) and the in-memory
endpoint of ``sessionmesh.testing`` both drive it; neither knows how the other moves bytes.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from typing import TYPE_CHECKING, Any

from sessionmesh import tracing
from sessionmesh.server._durable import Durable, Replayed, gone
from sessionmesh.server._errors import (
    Fail,
    invalid_arguments,
    not_json,
    session_closed,
    session_not_found,
    tool_not_found,
)
from sessionmesh.server._observe import Counted, observing
from sessionmesh.server._params import ArgumentError
from sessionmesh.server._recall import Recall, Remembered
from sessionmesh.server._security import denied
from sessionmesh.server._session import (
    CLOSED_UNDER_CALL,
    Session,
    SessionNotFoundError,
    SessionStore,
    TooManySessionsError,
    Turn,
    _current,
)
from sessionmesh.server._tool import each_once
from sessionmesh.v1 import session_service_pb2 as pb
from sessionmesh.wire.codec import NotJsonLike, from_struct, set_value
from sessionmesh.wire.deadline import DEADLINE, tightened
from sessionmesh.wire.keys import SESSION_CREATE_KEY, SESSION_ID_KEY
from sessionmesh.wire.names import is_durable, owner_of, short
from sessionmesh.wire.reasons import Reason
from sessionmesh.wire.tasks import cancel_and_wait

log = logging.getLogger("sessionmesh.agent")

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from contextlib import AbstractAsyncContextManager, AbstractContextManager
    from contextvars import Token
    from types import TracebackType

    from google.protobuf.struct_pb2 import Value

    from sessionmesh.server._durable import Durability
    from sessionmesh.server._inject import Injector
    from sessionmesh.server._metrics import AgentMetrics
    from sessionmesh.server._tool import BoundTool


class Plan:
    """A call ready to run: everything decided at arrival, before the first await, so that
    calls of one session keep their arrival order."""

    __slots__ = (
        "bound",
        "call_id",
        "carrier",
        "created",
        "deadline",
        "earlier",
        "kwargs",
        "new_id",
        "principal",
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
        principal: str,
    ) -> None:
        self.bound = bound
        self.session = session
        self.earlier = earlier
        self.new_id = new_id  # a session id to report to the caller: opened, or a replay's
        self.created = session is not None and new_id == session.id
        self.call_id = call_id
        self.kwargs: dict[str, Any] = {}
        self.turn: Turn | None = None
        self.principal = principal  # who called ("" without authentication)
        #: The caller's trace context (W3C headers), when tracing is on.
        self.carrier: Mapping[str, str] | None = None
        #: The caller's deadline (event loop time), if it sent one: calls the tool makes
        #: through its proxies get no more time than remains of it.
        self.deadline: float | None = None

    def expires_in(self, seconds: float | None) -> None:
        """The caller gives the call ``seconds`` (None: no deadline)."""
        if seconds is not None:
            self.deadline = asyncio.get_running_loop().time() + seconds

    def abandon(self) -> None:
        """Give up the call's place in line without running; a no-op once it has entered."""
        if self.turn is not None:
            self.turn.abandon()


class _Running:
    """A call in its turn, with its session as the current one and the tool's dependencies
    injected, for as long as the tool runs; counted, and (when on) traced and measured.
    Every tool run goes through it: unary calls, streams, the memory transport."""

    __slots__ = ("deadline_token", "dispatcher", "limit", "plan", "scope", "token", "watch")

    def __init__(self, dispatcher: Dispatcher, plan: Plan, limit: float | None) -> None:
        self.dispatcher = dispatcher
        self.plan = plan
        self.limit = limit  # the tool's own timeout or stream_timeout

    async def __aenter__(self) -> Counted | None:
        dispatcher = self.dispatcher
        dispatcher.calls_served += 1
        plan = self.plan
        self.watch = watch = dispatcher.observed(plan)
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
                    self.scope = self.dispatcher.injector.scope(
                        plan.bound, plan.session, plan.kwargs
                    )
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


class Dispatcher:
    def __init__(
        self,
        *,
        agent_name: str,
        tools: dict[str, BoundTool],
        store: SessionStore,
        injector: Injector,
        debug: bool = False,
        locate: Callable[[str], str | None] | None = None,
        recall: Recall | None = None,
        durability: Durability | None = None,
    ) -> None:
        self.agent_name = agent_name
        self.tools = tools
        self.store = store
        self.injector = injector
        self.debug = debug
        self.locate = locate
        self.draining = False
        self.recall = recall if recall is not None else Recall()
        #: Where durable sessions are kept, when the agent has a session store.
        self.durability = durability
        #: Each tool once, and their names: what ListTools and error messages show.
        self.bound_tools = each_once(tools)
        self.tool_names = sorted(b.spec.name for b in self.bound_tools)
        #: Calls with a call id run in tasks of their own, outliving their RPC: stop() ends them.
        self._detached: set[asyncio.Task[Any]] = set()
        #: Prometheus metrics, when the agent serves them.
        self.metrics: AgentMetrics | None = None
        #: Tool calls run so far (streams included): ListSessions reports it.
        self.calls_served = 0

    # -- deciding, at arrival -----------------------------------------------------------------

    def tool(self, name: str) -> BoundTool:
        bound = self.tools.get(name)
        if bound is None:
            raise tool_not_found(name, self.tool_names)
        return bound

    def new_session(self, bound: BoundTool | None, principal: str = "") -> Session:
        if self.draining:
            raise Fail(
                Reason.SHUTTING_DOWN,
                f"agent {self.agent_name!r} is shutting down and takes no new sessions",
            )
        durable = self.durability is not None
        try:
            session = self.store.create(
                bound.spec.session_ttl if bound else None, principal, durable=durable
            )
        except TooManySessionsError as exc:
            raise Fail(Reason.TOO_MANY_SESSIONS, str(exc)) from None
        if durable:
            session.durable = Durable()
        return session

    def plan(
        self, request: pb.CallRequest, session_id: str, create: bool, principal: str = ""
    ) -> Plan:
        """Find (or open) the call's session, find an earlier outcome of the same call id,
        bind the arguments and take the call's place in its session's line. Never awaits.
        ``principal`` is the caller: it may use only sessions it opened, and tools that
        allow it."""
        bound = self.tool(request.tool)
        allow = bound.spec.allow
        if allow is not None and principal not in allow:
            raise denied(f"{principal or 'an anonymous caller'} may not call {bound.spec.name!r}")
        call_id = request.call_id
        if call_id and principal:
            call_id = f"{principal}\x00{call_id}"  # one caller's ids never answer another's
        if session_id:
            try:
                session = self.store.get(session_id, principal)
            except SessionNotFoundError:
                session = self._adopt(session_id, principal)
            earlier = self.recall.get(session_id, call_id) if call_id else None
            plan = Plan(bound, session, earlier and earlier.outcome, "", call_id, principal)
        elif create:
            opened = self.recall.get("", call_id) if call_id else None
            if opened is not None:
                # A retry of a call that opened a session: the same session, the same outcome.
                return Plan(bound, None, opened.outcome, opened.session_id, call_id, principal)
            # Bind first: a call that cannot run must not leave a session nobody knows of.
            kwargs = self._bind(bound, request, None)
            session = self.new_session(bound, principal)
            plan = Plan(bound, session, None, session.id, call_id, principal)
            plan.kwargs = kwargs
            kwargs.update(dict.fromkeys(bound.session_params, session))
            plan.turn = session.turn()
            return plan
        elif bound.requires_session:
            raise Fail(
                Reason.SESSION_REQUIRED,
                f"tool {bound.spec.name!r} needs a session: send '{SESSION_ID_KEY}: <id>' from "
                f"CreateSession, or '{SESSION_CREATE_KEY}: 1' to open one with this call",
            )
        else:
            earlier = self.recall.get("", call_id) if call_id else None
            plan = Plan(bound, None, earlier and earlier.outcome, "", call_id, principal)
        if plan.earlier is None:
            plan.kwargs = self._bind(bound, request, plan.session)
            if plan.session is not None:
                plan.turn = plan.session.turn()
        return plan

    def _adopt(self, session_id: str, principal: str) -> Session:
        """A session this instance has no copy of: a durable one is taken over from the
        store (the caller sent it here: its owner is gone or unreachable); otherwise it is
        elsewhere or nowhere."""
        if self.durability is None or not is_durable(session_id) or session_id in self.store:
            raise self._not_here(session_id)
        try:
            return self.durability.adopt(session_id, principal)
        except TooManySessionsError as exc:
            raise Fail(Reason.TOO_MANY_SESSIONS, str(exc)) from None

    def _not_here(self, session_id: str) -> Fail:
        """A session this instance does not have: elsewhere (name the owner) or nowhere."""
        owner = owner_of(session_id)
        if owner != self.store.instance_id and self.locate is not None:
            endpoint = self.locate(owner)
            if endpoint is not None:
                return Fail(
                    Reason.SESSION_ELSEWHERE,
                    f"session {short(session_id)}... lives on instance {owner} at {endpoint}; "
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

    def _remember(self, plan: Plan, outcome: asyncio.Future[Any]) -> None:
        # A retry of a call that opened its session comes again without a session id.
        in_session = plan.session is not None and not plan.created
        key = plan.session.id if in_session and plan.session is not None else ""
        self.recall.put(key, plan.call_id, Remembered(plan.new_id, outcome))

    # -- running ------------------------------------------------------------------------------

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

    def running(
        self, plan: Plan, limit: float | None = None
    ) -> AbstractAsyncContextManager[Counted | None]:
        """``async with`` it around running the tool: the call's turn, session, dependencies
        and deadline (the caller's, or ``limit`` seconds from now if that is sooner). It
        gives what a stream adds its chunks to, while observed (metrics or tracing on)."""
        return _Running(self, plan, limit)

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

    async def saved(self, plan: Plan) -> None:
        """After a stream in a durable session: save its state before the stream ends."""
        session = plan.session
        if session is not None and session.durable is not None and self.durability is not None:
            await self.durability.save(session)

    def unsaved(self, plan: Plan) -> None:
        """A stream in a durable session ended without its answer: back to the saved state."""
        session = plan.session
        if session is not None and session.durable is not None and self.durability is not None:
            self.durability.revert(session)

    async def stop(self) -> None:
        """Cancel the calls still running in tasks of their own (their callers are gone,
        or the agent's grace period is over) and wait until they have ended."""
        await cancel_and_wait(*self._detached)

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
        task = asyncio.get_running_loop().create_task(self._run(plan))
        task.add_done_callback(_consume)
        if session is not None and session.durable is not None:
            task.add_done_callback(lambda done: self._forget_unsaved(plan, done))
        self._detached.add(task)
        task.add_done_callback(self._detached.discard)
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


def _consume(task: asyncio.Future[Any]) -> None:
    # Outcomes are kept for retries; mark failures as seen so asyncio does not log them.
    if not task.cancelled():
        task.exception()
