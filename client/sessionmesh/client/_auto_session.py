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
from typing import TYPE_CHECKING, NamedTuple

from sessionmesh import tracing
from sessionmesh.errors import (
    RemoteError,
    SessionLost,
    SessionOwnerLost,
    SessionOwnerUnavailable,
)
from sessionmesh.wire.names import short

if TYPE_CHECKING:
    from sessionmesh.client._transport import Endpoint, Transport

log = logging.getLogger("sessionmesh.proxy")

#: How long closing a session may take before the agent's TTL is left to do it.
CLOSE_DEADLINE = 5.0


class State(enum.Enum):
    IDLE = "idle"
    OPENING = "opening"
    OPEN = "open"
    LOST = "lost"


class Route(NamedTuple):
    """Where a call goes: the endpoint, its session id ("" for none), whether it opens one."""

    endpoint: Endpoint
    session_id: str
    create: bool


class AutoSession:
    __slots__ = (
        "__weakref__",
        "_ids",
        "_opened",
        "_prefix",
        "_reused",
        "endpoint",
        "lost",
        "pinned",
        "session_id",
        "state",
    )

    def __init__(self) -> None:
        self.state = State.IDLE
        self.session_id: str | None = None
        self.endpoint: Endpoint | None = None  # the owner, once OPEN
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
                    return Route(transport.owner(sid), sid, False)
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
                return Route(endpoint, "", True)
            assert self._opened is not None
            await self._opened.wait()  # another call is opening the session: wait for its id

    def opened(self, endpoint: Endpoint, session_id: str | None) -> None:
        """The call that was opening the session ended: with its id, or without (failed)."""
        if self.state is not State.OPENING:
            return  # reset while it was in flight
        if session_id:
            self.state = State.OPEN
            self.session_id = session_id
            self.endpoint = endpoint
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
            self.lost = error
            log.info("auto session %s lost: %s", short(session_id), error.message)

    def reset(self) -> tuple[str | None, SessionLost | None]:
        """Forget the session (cleanup); returns its id and why it was lost, if it was."""
        session_id, lost = self.session_id, self.lost
        event = self._opened
        self.state = State.IDLE
        self.session_id = self.endpoint = self.lost = self._opened = None
        self._reused = False
        if event is not None:
            event.set()  # calls waiting for an id route afresh
        return session_id, lost

    async def close(self, transport: Transport) -> None:
        """Close the session on its owner (if it is open) and forget it."""
        session_id, lost = self.reset()
        if session_id is not None:
            transport.forget(session_id)
        if session_id is None or isinstance(lost, SessionOwnerLost) or transport.closed:
            return  # nothing to close, or no channel left to close it on (its TTL will)
        try:
            endpoint = transport.owner(session_id)
        except SessionLost:
            return  # its owner is gone, and the session with it
        try:
            with tracing.span("close session"):
                await endpoint.close_session(session_id, CLOSE_DEADLINE)
            log.info("auto session %s closed", short(session_id))
        except RemoteError as exc:
            # The agent is gone or going; its TTL reaps the session. Cleanup must not mask
            # the error that may have brought us here.
            log.warning("auto session %s not closed: %s", short(session_id), exc.message)

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
