"""The auto session of a proxy: one state machine, shared by the proxy and its
``.options()`` copies.

    IDLE ──first call──▶ OPENING ──its answer brings an id──▶ OPEN ──SessionLost──▶ LOST
      ▲                     │ (no id: it failed)                │                     │
      └─────────────────────┴─────────── reset() ◀──────────────┴─────────────────────┘

Only the call that opens the session runs while OPENING; the others wait for its id. An
OPEN session's calls go to its owner. LOST refuses every call until ``reset()`` (cleanup):
a lost session is never silently replaced by a new, empty one.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import secrets
from typing import TYPE_CHECKING

from sessionmesh import tracing
from sessionmesh.core._tallies import SESSION_LOST, client_events
from sessionmesh.errors import (
    RemoteError,
    SessionLost,
    SessionOwnerLost,
    SessionOwnerUnavailable,
)
from sessionmesh.wire.names import short

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sessionmesh.client._transport import Endpoint, Transport

log = logging.getLogger("sessionmesh.proxy")

#: How long closing a session may take before the agent's TTL is left to do it.
CLOSE_DEADLINE = 5.0


class State(enum.Enum):
    IDLE = "idle"
    OPENING = "opening"
    OPEN = "open"
    LOST = "lost"


class Route:
    """Where a call goes: the endpoint, its session id ("" for none), whether it opens one.

    A route that opens the auto session is how the call that opens it reports back: its
    ``opened()`` moves the session to OPEN (an id) or back to IDLE (None), once; leaving
    ``settling()`` without a word means the opening failed. The state machine's moves are
    its own: callers only say what happened."""

    __slots__ = ("_auto", "create", "endpoint", "session_id")

    def __init__(
        self, endpoint: Endpoint, session_id: str = "", auto: AutoSession | None = None
    ) -> None:
        self.endpoint = endpoint
        self.session_id = session_id
        self.create = auto is not None
        self._auto = auto

    def opened(self, session_id: str | None) -> None:
        """The opening call learned the session's id (None: it failed); the first word
        counts, later ones change nothing."""
        auto, self._auto = self._auto, None
        if auto is not None:
            auto._opened_on(self.endpoint, session_id)

    @contextlib.contextmanager
    def settling(self) -> Iterator[Route]:
        """Around the call: one that ends without ``opened()`` did not open the session."""
        try:
            yield self
        finally:
            self.opened(None)


class AutoSession:
    __slots__ = (
        "__weakref__",
        "_ids",
        "_opened",
        "_prefix",
        "_reused",
        "lost",
        "pinned",
        "session_id",
        "state",
    )

    def __init__(self) -> None:
        self.state = State.IDLE
        self.session_id: str | None = None
        self.lost: SessionLost | None = None
        #: A stateful proxy's instance for calls without a session (see ``pin``).
        self.pinned: Endpoint | None = None
        self._opened: asyncio.Event | None = None
        self._reused = False
        self._prefix = secrets.token_hex(12) + "-"
        self._ids = itertools.count(1)

    def next_call_id(self) -> str:
        """An id that makes a retried call run once: unique to this proxy family."""
        return f"{self._prefix}{next(self._ids)}"

    async def route(self, transport: Transport) -> Route:
        """Where the next call of this auto session goes; waits while it is being opened."""
        while True:
            state = self.state
            if state is State.OPEN:
                sid = self.session_id
                assert sid is not None
                if not self._reused:  # the lifecycle in the log, without a line per call
                    self._reused = True
                    log.info("auto session %s reused", short(sid))
                try:
                    # The owner, by the session id: gone from the registry means lost.
                    return Route(transport.owner(sid), sid)
                except SessionLost as gone:
                    self.failed(sid, gone)
                    raise
            if state is State.LOST:
                lost = self.lost
                assert lost is not None
                raise type(lost)(
                    f"the auto session is lost ({lost.message}); call cleanup_auto_session() "
                    "or leave the proxy's `async with` block to start a new one",
                    code=lost.code,
                    reason=lost.reason,
                    metadata=lost.metadata,
                )
            if state is State.IDLE:
                endpoint = transport.pick()
                self.state = State.OPENING
                self._opened = asyncio.Event()
                transport.track(self)  # so that closing the client closes this session
                return Route(endpoint, auto=self)
            assert self._opened is not None
            await self._opened.wait()  # another call is opening the session: wait for its id

    def _opened_on(self, endpoint: Endpoint, session_id: str | None) -> None:
        """The call that was opening the session ended: with its id, or without (failed).
        Its route says so (``Route.opened``)."""
        if self.state is not State.OPENING:
            return  # reset while it was in flight
        if session_id:
            self.state = State.OPEN
            self.session_id = session_id
            log.info("auto session %s opened on %s", short(session_id), endpoint.address)
        else:
            self.state = State.IDLE
        event, self._opened = self._opened, None
        if event is not None:
            event.set()

    def failed(self, session_id: str, error: RemoteError) -> None:
        """A call in ``session_id`` failed: a SessionLost in this (open) session marks it lost,
        so no later call reopens it silently. An owner unreachable for now is not lost."""
        if (
            isinstance(error, SessionLost)
            and not isinstance(error, SessionOwnerUnavailable)
            and self.state is State.OPEN
            and session_id == self.session_id
        ):
            self.state = State.LOST
            client_events[SESSION_LOST] += 1
            self.lost = error
            log.info("auto session %s lost: %s", short(session_id), error.message)

    def reset(self) -> tuple[str | None, SessionLost | None]:
        """Forget the session (cleanup); returns its id and why it was lost, if it was."""
        session_id, lost = self.session_id, self.lost
        event = self._opened
        self.state = State.IDLE
        self.session_id = self.lost = self._opened = None
        self._reused = False
        if event is not None:
            event.set()  # calls waiting for an id route afresh
        return session_id, lost

    async def close(self, transport: Transport) -> None:
        """Close the session on its owner (if it is open) and forget it."""
        session_id, lost = self.reset()
        if session_id is None:
            return
        if isinstance(lost, SessionOwnerLost) or transport.closed:
            transport.forget(session_id)
            return  # no owner, or no channel left to close it on (its TTL will)
        try:
            # Where it lives now (it may have moved): the transport forgets it only after.
            with tracing.span("close session"):
                await transport.close_session(session_id, CLOSE_DEADLINE)
            log.info("auto session %s closed", short(session_id))
        except SessionLost:
            pass  # its owner is gone, and the session with it
        except RemoteError as exc:
            # No live instance to close it on (a durable session's replicas are all down),
            # or the agent is going: its TTL reaps the session (or its store's does).
            # Closing never fails for that, and cleanup must not mask the error that may
            # have brought us here.
            log.warning("auto session %s not closed: %s", short(session_id), exc.message)
        finally:
            transport.forget(session_id)

    def __del__(self) -> None:
        if self.state is State.OPEN and self.session_id:
            # At interpreter exit logging may be half torn down: a warning is not worth a crash.
            with contextlib.suppress(Exception):
                log.warning(
                    "auto session %s was dropped while open: leave the proxy's `async with` "
                    "block, call cleanup_auto_session() or close the client; the agent "
                    "reclaims it only after its idle TTL",
                    short(self.session_id),
                )

    def pin(self, transport: Transport) -> Endpoint:
        """The instance a stateful proxy's session-less calls stay on, re-chosen once the
        transport no longer lists it (its instance left)."""
        pinned = self.pinned
        if pinned is None or not transport.knows(pinned):
            pinned = self.pinned = transport.pick()
        return pinned

    def unpin(self, endpoint: Endpoint) -> None:
        """``endpoint`` could not be reached: the next call picks again."""
        if self.pinned is endpoint:
            self.pinned = None
