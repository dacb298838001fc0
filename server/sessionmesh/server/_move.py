"""Sessions that move: a replica hands a live session to another replica of the same agent
(when it drains, or on demand), and takes sessions handed to it.

A move is a turn in the session's line: it waits for the running call, so no call of the
session runs on both sides. In that turn the state (as JSON, the codec durable sessions are
saved with) and the outcomes of the calls that carried a call id go to the target; once the
target has accepted, this copy is gone and the calls still in line, and any that come later,
are redirected (``SESSION_ELSEWHERE``) to the new owner. A durable session needs no hand-over:
its state is in the store, so it is released and redirected, and the target adopts it at its
next call. A session whose state has no JSON form stays, with a WARNING saying why.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING, Any

from google.protobuf.struct_pb2 import Value

from sessionmesh.errors import MeshError
from sessionmesh.server._durable import Replayed, first_unsaveable
from sessionmesh.server._errors import Fail, invalid_arguments, moved
from sessionmesh.server._recall import Remembered
from sessionmesh.server._sessions import TooManySessionsError
from sessionmesh.v1 import registry_service_pb2 as rpb
from sessionmesh.v1 import session_service_pb2 as pb
from sessionmesh.wire import status
from sessionmesh.wire.codec import NotJsonLike, set_value
from sessionmesh.wire.names import is_durable, short, successors, well_formed
from sessionmesh.wire.reasons import Reason

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from sessionmesh.client import MeshClient
    from sessionmesh.server._runner import Runner
    from sessionmesh.server._session import Session

log = logging.getLogger("sessionmesh.move")

#: Hand-overs in flight at once while draining (each is one small RPC).
_AT_ONCE = 8
#: How long a hand-over RPC may take.
_ACCEPT_TIMEOUT = 5.0


class Mover:
    """Moves this instance's sessions to other replicas of its agent, and takes theirs."""

    def __init__(
        self,
        runner: Runner,
        mesh: MeshClient | None,
        locate: Callable[[str], str | None],
        wait: float,
    ) -> None:
        self.runner = runner
        self.store = runner.store
        self.mesh = mesh
        self.locate = locate
        #: How long a move waits for the call running in its session before giving up.
        self.wait = wait
        #: How long each session of the last drain was held (no call of it could run).
        self.pauses: list[float] = []

    def replicas(self) -> dict[str, rpb.Instance]:
        """The other serving replicas of this agent, by instance id."""
        if self.mesh is None:
            return {}
        me = self.store.instance_id
        return {
            i.instance_id: i
            for i in self.mesh.instances()
            if i.agent_name == self.runner.agent_name
            and i.instance_id != me
            and i.state == rpb.INSTANCE_STATE_SERVING
        }

    # -- handing over ----------------------------------------------------------------------

    async def drain(self) -> int:
        """Move every session to the other serving replicas, each to the first of them in
        its ``successors`` order (where a client that finds this instance gone looks
        first). Returns how many moved; the others stay, and close as they did before."""
        replicas = self.replicas()
        sessions = self.store.sessions()
        if not replicas or not sessions:
            return 0
        began = time.perf_counter()
        self.pauses = []
        stayed = await self._move_all(
            (s, replicas[successors(s.id, replicas)[0]]) for s in sessions
        )
        pauses = sorted(self.pauses)
        log.info(
            "moved %d of %d session(s) to %d other replica(s) in %.0f ms; each paused "
            "p50 %.1f ms, p99 %.1f ms",
            len(sessions) - len(stayed),
            len(sessions),
            len(replicas),
            (time.perf_counter() - began) * 1000,
            pauses[len(pauses) // 2] * 1000 if pauses else 0.0,
            pauses[min(len(pauses) - 1, len(pauses) * 99 // 100)] * 1000 if pauses else 0.0,
        )
        return len(sessions) - len(stayed)

    async def move_some(self, to: str, session_id: str, count: int) -> pb.MoveSessionsResponse:
        """MoveSessions: ``session_id``, or up to ``count`` sessions (0: all), to ``to``."""
        target = self.replicas().get(to)
        if target is None:
            raise Fail(
                Reason.INVALID_ARGUMENTS,
                f"instance {to!r} is not a serving replica of agent {self.runner.agent_name!r} "
                "in this agent's view of the registry",
                {"field": "to_instance"},
            )
        if session_id:
            session = self.store.find(session_id)
            chosen = [session] if session is not None else []
        else:
            # The longest idle first: the least likely to have a call waiting.
            chosen = sorted(self.store.sessions(), key=lambda s: s.last_used)
            chosen = chosen[:count] if count else chosen
        stayed = await self._move_all((s, target) for s in chosen)
        return pb.MoveSessionsResponse(moved=len(chosen) - len(stayed), stayed=stayed)

    async def _move_all(self, moves: Iterable[tuple[Session, rpb.Instance]]) -> list[str]:
        limit = asyncio.Semaphore(_AT_ONCE)
        calls = self.runner.recall.by_session()

        async def one(session: Session, target: rpb.Instance) -> str | None:
            async with limit:
                why = await self.move(session, target, calls.get(session.id, ()))
            return f"{session.short_id}...: {why}" if why else None

        answers = await asyncio.gather(*(one(s, t) for s, t in moves))
        return [why for why in answers if why]

    async def move(
        self,
        session: Session,
        target: rpb.Instance,
        calls: Iterable[tuple[str, Remembered]] = (),
    ) -> str | None:
        """Move one session to ``target``; None when it moved, else why it stayed."""
        # A close meanwhile waits for the move (CloseSession), then closes the session where
        # it is: here, or on the target after a redirect. It never cuts a hand-over short.
        if session.moving is not None:
            return "another move of it is under way"
        moving = session.moving = asyncio.get_running_loop().create_future()
        turn = session.turn()
        try:
            try:
                async with asyncio.timeout(self.wait):
                    await turn.__aenter__()
            except TimeoutError:
                return f"a call ran in it for more than {self.wait:g} s"
            session._holder = None  # (so nothing closing it cancels the hand-over)
            try:
                return await self._hand_over_in_turn(session, target, calls)
            finally:
                turn.leave()
        finally:
            moving.set_result(None)
            session.moving = None

    async def _hand_over_in_turn(
        self, session: Session, target: rpb.Instance, calls: Iterable[tuple[str, Remembered]]
    ) -> str | None:
        held = time.perf_counter()
        if session.closed:
            return "it closed meanwhile"
        failure = moved(session.id, target.instance_id, self.locate)
        if session.durable is None:
            try:
                request = self._hand_over(session, calls)
            except Unmovable as exc:
                log.warning("session %s stays here: %s", session.short_id, exc)
                return str(exc)
            try:
                assert self.mesh is not None
                await self.mesh.endpoint(target).accept_session(request, _ACCEPT_TIMEOUT)
            except MeshError as exc:
                log.warning(
                    "session %s stays here: instance %s did not take it (%s)",
                    session.short_id,
                    target.instance_id,
                    exc,
                )
                return f"instance {target.instance_id} did not take it: {exc}"
        # A durable session's state is in its store already: the target adopts it there.
        self.store.moved_out(session, target.instance_id, failure)
        self.pauses.append(time.perf_counter() - held)
        return None

    def _hand_over(
        self, session: Session, calls: Iterable[tuple[str, Remembered]]
    ) -> pb.AcceptSessionRequest:
        state = session.state
        try:
            text = json.dumps(state, separators=(",", ":"), allow_nan=False)
            if json.loads(text) != state:
                raise ValueError
        except (TypeError, ValueError):
            key, why = first_unsaveable(state)
            raise Unmovable(f"session.state[{key!r}] {why}: only a JSON state moves") from None
        request = pb.AcceptSessionRequest(
            session_id=session.id,
            principal=session.principal,
            state=text,
            from_instance=self.store.instance_id,
            moves=session.moves,
        )
        request.idle_timeout.FromNanoseconds(int(session.ttl * 1e9))
        for call_id, remembered in calls:
            outcome = remembered.outcome
            if not outcome.done() or outcome.cancelled():
                continue  # waiting in line: it did not run, and will be redirected
            kept = request.calls.add(call_id=call_id)
            failure = outcome.exception()
            if isinstance(failure, Fail):
                kept.error.code = failure.code
                kept.error.message = failure.message
                kept.error.details.extend(failure.details())
            elif failure is None:
                _encode(kept.result, outcome.result())
        return request

    # -- taking over -------------------------------------------------------------------------

    def accept(self, request: pb.AcceptSessionRequest) -> None:
        """AcceptSession: take a session another replica hands over (a retry of a hand-over
        this instance took already is answered as the first was)."""
        session_id = request.session_id
        if not well_formed(session_id) or is_durable(session_id):
            raise invalid_arguments(
                "session_id", "a hand-over carries the id of a session kept in memory"
            )
        if session_id in self.store:
            return
        if self.runner.draining:
            raise Fail(
                Reason.SHUTTING_DOWN,
                f"agent {self.runner.agent_name!r} is shutting down and takes no sessions",
            )
        try:
            state = json.loads(request.state or "{}")
        except ValueError:
            state = None
        if not isinstance(state, dict):
            raise invalid_arguments("state", "a hand-over's state is a JSON object")
        ttl = request.idle_timeout.ToNanoseconds() / 1e9 or self.store.default_ttl
        try:
            session = self.store.accept(session_id, request.principal, ttl, request.moves + 1)
        except TooManySessionsError as exc:
            raise Fail(Reason.TOO_MANY_SESSIONS, str(exc)) from None
        session.state.update(state)
        loop = asyncio.get_running_loop()
        for kept in request.calls:
            outcome: asyncio.Future[Any] = loop.create_future()
            if kept.HasField("error"):
                detail = status.decode(kept.error.details)
                outcome.set_exception(
                    Fail(
                        detail.reason,
                        kept.error.message,
                        detail.metadata,
                        code=status.status_code(kept.error.code),
                    )
                )
                outcome.exception()  # seen: a replay raises it again
            else:
                outcome.set_result(Replayed(kept.result))
            self.runner.recall.put(session_id, kept.call_id, Remembered("", outcome))
        log.info("session %s moved here from instance %s", short(session_id), request.from_instance)


class Unmovable(Exception):
    """A session that cannot be handed over (its state has no JSON form)."""


def _encode(out: Value, result: Any) -> None:
    if isinstance(result, Replayed):
        out.CopyFrom(result.value)
        return
    try:
        set_value(out, result)
    except NotJsonLike:
        from pydantic_core import to_jsonable_python  # a model, a dataclass, a date...

        set_value(out, to_jsonable_python(result))
