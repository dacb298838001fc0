"""The open sessions of one agent instance: opening and adopting them, per-caller limits,
closing (callbacks run once, after the calls already in line), releasing a durable copy,
and the reaper that closes idle ones."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import logging
import time
from collections.abc import Awaitable, Callable

from sessionmesh import tracing
from sessionmesh.core._tasks import Tasks
from sessionmesh.server import _trim
from sessionmesh.server._session import CLOSED_UNDER_CALL, Session
from sessionmesh.wire.names import new_session_id, short

log = logging.getLogger("sessionmesh.session")


#: Moved sessions remembered for redirects (about 100 bytes each).
MAX_FORWARDS = 100_000


class SessionNotFoundError(LookupError):
    pass


class TooManySessionsError(RuntimeError):
    pass


class SessionStore:
    """The open sessions of one agent instance, with a reaper for idle ones."""

    def __init__(
        self,
        instance_id: str,
        *,
        default_ttl: float,
        max_sessions: int,
        max_per_principal: int | None = None,
        hibernate_after: float | None = None,
        max_live: int | None = None,
    ) -> None:
        self.instance_id = instance_id
        self.hibernate_after = hibernate_after
        self.max_live = max_live
        self.default_ttl = default_ttl
        self.max_sessions = max_sessions
        self.max_per_principal = max_per_principal
        self._per_principal: collections.Counter[str] = collections.Counter()
        self._sessions: dict[str, Session] = {}
        self._deadlines: list[tuple[float, str]] = []
        self._wakeup = asyncio.Event()
        self.empty = asyncio.Event()  # set while no session is open
        self.empty.set()
        #: The reaper (stopped at stop), and closes started by code that cannot wait for
        #: them (finished at stop).
        self._reaper = Tasks(f"the session reaper of instance {instance_id}", log)
        self._closing = Tasks(f"the sessions of instance {instance_id}", log)
        self.counters = {
            "created": 0,
            "closed": 0,
            "expired": 0,
            "lost": 0,
            "released": 0,
            "moved_in": 0,
            "moved_out": 0,
            "hibernated": 0,
        }
        #: Sessions that moved to another replica: session id -> (its instance id there, the
        #: principal that owns it), so that its caller is redirected (the oldest forgotten
        #: past MAX_FORWARDS).
        self.forwards: dict[str, tuple[str, str]] = {}
        #: For durable sessions: remove the stored record; False when another instance owns
        #: the session now (then it is not over, and its close callbacks do not run here).
        self.durable_closing: Callable[[Session], Awaitable[bool]] | None = None

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions

    def sessions(self) -> list[Session]:
        return list(self._sessions.values())

    def start(self) -> None:
        if not self._reaper:  # it reaps until stop()
            self._reaper.start(self._reap())

    def create(
        self, ttl: float | None = None, principal: str = "", *, durable: bool = False
    ) -> Session:
        session = Session(
            new_session_id(self.instance_id, durable=durable), ttl or self.default_ttl, principal
        )
        self._add(session)
        self.counters["created"] += 1
        log.info("session %s created", short(session.id))
        return session

    def adopt(self, session_id: str, principal: str) -> Session:
        """A durable session taken over from another owner (its state is loaded in its first
        turn, which the caller takes at once)."""
        session = Session(session_id, self.default_ttl, principal)
        self._add(session)
        return session

    def accept(self, session_id: str, principal: str, ttl: float, moves: int) -> Session:
        """A session another replica handed over (its state is filled in by the caller)."""
        session = Session(session_id, ttl, principal)
        session.moves = moves
        self._add(session)
        self.forwards.pop(session_id, None)  # it came back
        self.counters["moved_in"] += 1
        return session

    def moved_out(self, session: Session, to: str, failure: Exception) -> None:
        """``session`` now lives on instance ``to``: calls in its line are told ``failure``
        (a redirect) on their turn, and calls that come later are redirected too."""
        if self._remove(session.id) is None:
            return
        session.failure = failure
        forwards = self.forwards
        forwards[session.id] = (to, session.principal)
        if len(forwards) > MAX_FORWARDS:
            del forwards[next(iter(forwards))]
        self.counters["moved_out"] += 1
        log.info("session %s moved to instance %s", short(session.id), to)

    def find(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def moving(self, session_id: str) -> asyncio.Future[None] | None:
        """Done when the move of this session is over, if one is under way."""
        session = self._sessions.get(session_id)
        return session.moving if session is not None else None

    def moved_to(self, session_id: str, principal: str) -> str | None:
        """The instance a session moved to from here, told only to the caller that owns it
        (anyone else learns what a forged id would)."""
        forward = self.forwards.get(session_id)
        return forward[0] if forward is not None and forward[1] == principal else None

    def _add(self, session: Session) -> None:
        principal = session.principal
        if self.max_live is not None and len(self._sessions) >= self.max_live:
            self._hibernate_some(self.max_live)
        if len(self._sessions) >= self.max_sessions:
            raise TooManySessionsError(
                f"this agent has {len(self._sessions)} open sessions, its limit "
                f"(max_sessions={self.max_sessions}); close sessions or raise the limit"
            )
        cap = self.max_per_principal
        if principal and cap is not None and self._per_principal[principal] >= cap:
            raise TooManySessionsError(
                f"{principal} has {cap} open sessions on this agent, the limit per caller "
                "(max_sessions_per_principal); close some first"
            )
        self._sessions[session.id] = session
        if principal:
            self._per_principal[principal] += 1
        self.empty.clear()
        # Its durability is set just after: a session that may hibernate is looked at then.
        lifetime = min(session.ttl, self.hibernate_after or session.ttl)
        entry = (session.last_used + lifetime, session.id)
        heapq.heappush(self._deadlines, entry)
        if self._deadlines[0] is entry:
            self._wakeup.set()  # the reaper sleeps towards a later deadline than this one

    # -- hibernation: a durable session's state is in its store, so memory may let it go --

    def _lifetime(self, session: Session) -> float:
        """How long the session may stay idle in memory: its TTL, or less if it hibernates."""
        after = self.hibernate_after
        if after is not None and session.durable is not None and after < session.ttl:
            return after
        return session.ttl

    @staticmethod
    def _can_hibernate(session: Session) -> bool:
        """Idle (no call running or waiting), and saved at least once."""
        durable = session.durable
        return durable is not None and not durable.new and durable.epoch > 0 and not session._busy

    def hibernate(self, session: Session, why: str) -> None:
        """Let go of an idle durable session: its next call, on any replica, adopts it from
        the store (the TTL there counts from its last call, as it did here)."""
        self.release(session.id, f"hibernated: {why}", event="hibernated")
        _trim.soon()  # its memory goes back to the system, not only to the allocator

    def _hibernate_some(self, cap: int) -> None:
        """At the cap of live sessions: the least recently used idle durable ones hibernate
        (a sixteenth of the cap at once, so a sweep of new sessions scans rarely). With none
        to hibernate, the caller is refused (max_live_sessions)."""
        idle = [s for s in self._sessions.values() if self._can_hibernate(s)]
        if not idle:
            raise TooManySessionsError(
                f"this agent holds {len(self._sessions)} sessions in memory, its limit "
                f"(max_live_sessions={cap}), and none of them can hibernate (only an idle "
                "durable session can); close sessions or raise the limit"
            )
        for session in heapq.nsmallest(max(1, cap // 16), idle, key=lambda s: s.last_used):
            self.hibernate(session, f"the agent holds max_live_sessions={cap}")

    def get(self, session_id: str, principal: str | None = None) -> Session:
        """The open session with this id; with ``principal``, only if that caller opened it
        (anyone else is told exactly what a forged id is told)."""
        session = self._sessions.get(session_id)
        if session is None or (principal is not None and session.principal != principal):
            raise SessionNotFoundError(session_id)
        return session

    def _remove(self, session_id: str) -> Session | None:
        session = self._sessions.pop(session_id, None)
        if session is None:
            return None
        session.closed = True
        if session.principal:
            left = self._per_principal[session.principal] - 1
            if left:
                self._per_principal[session.principal] = left
            else:
                del self._per_principal[session.principal]
        if not self._sessions:
            self.empty.set()
        return session

    def release(self, session_id: str, why: str, *, event: str = "released") -> None:
        """Let go of this copy of a durable session without closing it: it lives on in its
        store (another instance owns it now, or will). No close callbacks run; calls in line
        fail on their turn with the session's ``durable.failure``."""
        session = self._remove(session_id)
        if session is None:
            return
        self.counters[event] += 1
        log.info("session %s released: %s", short(session_id), why)
        holder = session._holder
        if holder is not None and holder is not asyncio.current_task():
            holder.cancel(CLOSED_UNDER_CALL)

    async def close(self, session_id: str, *, why: str = "closed") -> bool:
        session = self._remove(session_id)
        if session is None:
            return False
        # "lost": closed because the registry declared this instance lost (callers were told).
        event = "expired" if why == "expired" else "lost" if "declared" in why else "closed"
        self.counters[event] += 1
        log.info("session %s %s", short(session_id), why)
        tracing.event(f"session {why}", {"sessionmesh.session": short(session_id)})
        # What runs in the session is cancelled (its caller is told the session closed
        # under it), and what waits in line fails on its turn: closing never waits for a
        # stream to end by itself.
        holder = session._holder
        if holder is not None and holder is not asyncio.current_task():
            holder.cancel(CLOSED_UNDER_CALL)
        closing = self.durable_closing
        if session.durable is not None and closing is not None and not await closing(session):
            return True  # another instance owns it now: the session is not over
        if session._callbacks:
            # After the calls already in line (they end at once): callbacks see the final state.
            async with session.turn():
                await session._run_callbacks()
        return True

    def close_soon(self, session_id: str, why: str) -> None:
        """Close a session from code that cannot wait for it (say, a cancelled call)."""
        self._closing.start(self.close(session_id, why=f"closed: {why}"))

    async def close_all(self, *, why: str = "closed at shutdown") -> None:
        """Close every session; durable ones are released instead (they live on in their
        store for another instance to adopt)."""
        for sid, session in list(self._sessions.items()):
            if session.durable is not None:
                self.release(sid, why.replace("closed", "released", 1))
            else:
                await self.close(sid, why=why)

    async def stop(self) -> None:
        await self._reaper.aclose()
        await self._closing.wait()  # closes are finished, not cut off
        await self.close_all()

    async def _reap(self) -> None:
        heap = self._deadlines
        while True:
            self._wakeup.clear()
            if not heap:
                await self._wakeup.wait()
                continue
            now = time.monotonic()
            deadline, sid = heap[0]
            if deadline > now:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), deadline - now)
                continue
            heapq.heappop(heap)
            session = self._sessions.get(sid)
            if session is None:
                continue
            lifetime = self._lifetime(session)
            due = session.last_used + lifetime
            if session.active or due > now:
                heapq.heappush(heap, (max(due, now + 0.05), sid))
                continue
            if lifetime < session.ttl:
                if self._can_hibernate(session):
                    self.hibernate(session, f"idle {lifetime:g} s")
                else:  # busy, or not saved yet: look again later
                    heapq.heappush(heap, (now + lifetime, sid))
                continue
            with tracing.span("session expiry"):
                await self.close(sid, why="expired")
