"""The transport-neutral heart of an agent, first half: admission. A call is planned at its
arrival, before any await: its tool and allow-list checked, its session found (or opened, or
adopted from the store), an earlier outcome of the same call id found, its arguments bound,
its place in its session's line taken. The runner (``_runner.py``) runs what is admitted;
no part of either knows gRPC.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from sessionmesh.server._durable import Durable
from sessionmesh.server._errors import (
    Fail,
    elsewhere,
    invalid_arguments,
    moved,
    session_not_found,
    tool_not_found,
)
from sessionmesh.server._params import ArgumentError
from sessionmesh.server._recall import Recall
from sessionmesh.server._security import denied
from sessionmesh.server._session import Session, Turn
from sessionmesh.server._sessions import SessionNotFoundError, SessionStore, TooManySessionsError
from sessionmesh.server._tool import each_once
from sessionmesh.v1 import session_service_pb2 as pb
from sessionmesh.wire.codec import TooDeep, from_struct
from sessionmesh.wire.keys import SESSION_CREATE_KEY, SESSION_ID_KEY
from sessionmesh.wire.names import SESSION_ID_SHAPE, is_durable, owner_of, well_formed
from sessionmesh.wire.reasons import Reason

log = logging.getLogger("sessionmesh.agent")

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from sessionmesh.server._durable import Durability
    from sessionmesh.server._inject import Injector
    from sessionmesh.server._metrics import AgentMetrics
    from sessionmesh.server._tool import BoundTool


class Plan:
    """A call ready to run: everything decided at arrival, before the first await, so that
    calls of one session keep their arrival order."""

    __slots__ = (
        "asked",
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
        asked: str,
    ) -> None:
        self.bound = bound
        #: The name the caller used (a tool's name or its capability): what spans are named.
        self.asked = asked
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
            if not well_formed(session_id):
                raise invalid_arguments(
                    SESSION_ID_KEY, f"'{SESSION_ID_KEY}' is not a session id: {SESSION_ID_SHAPE}"
                )
            try:
                session = self.store.get(session_id, principal)
            except SessionNotFoundError:
                session = self._adopt(session_id, principal)
            earlier = self.recall.get(session_id, call_id) if call_id else None
            plan = Plan(
                bound, session, earlier and earlier.outcome, "", call_id, principal, request.tool
            )
        elif create:
            opened = self.recall.get("", call_id) if call_id else None
            if opened is not None:
                # A retry of a call that opened a session: the same session, the same outcome.
                return Plan(
                    bound, None, opened.outcome, opened.session_id, call_id, principal, request.tool
                )
            # Bind first: a call that cannot run must not leave a session nobody knows of.
            kwargs = self._bind(bound, request, None)
            session = self.new_session(bound, principal)
            plan = Plan(bound, session, None, session.id, call_id, principal, request.tool)
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
            plan = Plan(
                bound, None, earlier and earlier.outcome, "", call_id, principal, request.tool
            )
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
            raise self._not_here(session_id, principal)
        try:
            return self.durability.adopt(session_id, principal)
        except TooManySessionsError as exc:
            raise Fail(Reason.TOO_MANY_SESSIONS, str(exc)) from None

    def _not_here(self, session_id: str, principal: str) -> Fail:
        """A session this instance does not have: elsewhere (name the owner) or nowhere."""
        moved_to = self.store.moved_to(session_id, principal)
        if moved_to is not None:
            return moved(session_id, moved_to, self.locate)
        owner = owner_of(session_id)
        if owner != self.store.instance_id and self.locate is not None:
            endpoint = self.locate(owner)
            if endpoint is not None:
                return elsewhere(
                    session_id, owner, endpoint, "lives on instance", "send its calls there"
                )
        return session_not_found(session_id)

    def _bind(
        self, bound: BoundTool, request: pb.CallRequest, session: Session | None
    ) -> dict[str, Any]:
        try:
            return bound.bind(from_struct(request.arguments), session)
        except ArgumentError as exc:
            raise invalid_arguments(exc.field, str(exc)) from None
        except TooDeep as exc:  # the limit every client's encoder applies, applied here too
            raise invalid_arguments(exc.path, f"argument {exc}") from None
