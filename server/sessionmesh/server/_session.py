"""A session on an agent: its state, its close callbacks, and the line its calls keep (one at
a time, in arrival order, a worker thread included). The open sessions are `_sessions.py`."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import functools
import inspect
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from sessionmesh.wire.names import short

if TYPE_CHECKING:
    from types import TracebackType

log = logging.getLogger("sessionmesh.session")

CloseCallback = Callable[[], Awaitable[None] | None]

#: The message of the cancellation that closing a session sends the call running in it.
CLOSED_UNDER_CALL = "sessionmesh: the session was closed while this call ran in it"

_current: contextvars.ContextVar[Session | None] = contextvars.ContextVar(
    "sessionmesh_session", default=None
)


def current_session() -> Session | None:
    """The session the running tool was called in, or None for a call without one."""
    return _current.get()


class Session:
    """A session on this agent: an ``id``, a ``state`` dict that lives as long as it does, and
    ``on_close`` callbacks that run exactly once when it is closed, expires, or the agent stops.

    Annotate a tool parameter with ``mesh.Session`` to receive it::

        @mesh.tool(session_required=True)
        def increment(session: mesh.Session, increment: int = 1) -> int:
            session.state["n"] = session.state.get("n", 0) + increment
            return session.state["n"]
    """

    # Slots and lazily made members keep an idle session small (issue: <= 2 KB each).
    __slots__ = (
        "_busy",
        "_callbacks",
        "_holder",
        "_line",
        "_state",
        "_thread",
        "active",
        "closed",
        "durable",
        "failure",
        "id",
        "last_used",
        "moves",
        "moving",
        "principal",
        "ttl",
    )

    def __init__(self, session_id: str, ttl: float, principal: str = "") -> None:
        self.id = session_id
        self.ttl = ttl
        #: Who opened it ("" without authentication): only they can use, see or close it.
        self.principal = principal
        self.last_used = time.monotonic()
        self.closed = False
        self.active = 0
        self._busy = False
        self._holder: asyncio.Task[Any] | None = None  # the task whose turn it is
        self._line: collections.deque[asyncio.Future[None]] | None = None
        self._state: dict[str, Any] | None = None
        self._callbacks: list[CloseCallback] | None = None
        #: The worker thread of the call in its turn (a plain ``def`` tool), while it runs.
        self._thread: Worker | None = None
        #: For a session kept in a session store: its fence and saved copy (``_durable.py``).
        self.durable: Any = None
        #: Why this copy ended without the session closing (it moved to another replica):
        #: what the calls still in its line are told (a ``Fail``).
        self.failure: Any = None
        #: How many times the session has moved between replicas (a move's fence).
        self.moves = 0
        #: While a move hands the session over: done when the move is over.
        self.moving: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        return f"<Session {short(self.id)}{' closed' if self.closed else ''}>"

    @property
    def short_id(self) -> str:
        """The id shortened for logs and messages (the whole id is a secret)."""
        return short(self.id)

    @property
    def state(self) -> dict[str, Any]:
        if self._state is None:
            self._state = {}
        return self._state

    def on_close(self, callback: CloseCallback) -> None:
        """Run ``callback`` (plain or async) once when the session ends."""
        if self._callbacks is None:
            self._callbacks = []
        self._callbacks.append(callback)

    # Calls of a session run one at a time in arrival order. A call takes its place in line
    # (turn()) the moment it arrives, before anything can yield to the event loop, and waits
    # for its turn later (`async with`): so order holds however many tasks a call goes through.

    def turn(self) -> Turn:
        """Take a place in line now; ``async with`` it to wait for the turn and hold it."""
        return Turn(self)

    def _enqueue(self) -> asyncio.Future[None] | None:
        if not self._busy:
            self._busy = True
            return None
        if self._line is None:
            self._line = collections.deque()
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._line.append(turn)
        return turn

    def _release(self) -> None:
        """End the current turn: hand it to the next in line."""
        line = self._line
        while line:
            turn = line.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self._busy = False

    @property
    def waiting(self) -> int:
        """Calls waiting for their turn."""
        return sum(1 for t in self._line if not t.done()) if self._line else 0

    async def _run_callbacks(self) -> None:
        for cb in self._callbacks or ():
            try:
                result = cb()
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("session %s: close callback %r failed", short(self.id), cb)
        self._callbacks = None


class Turn:
    """A call's place in its session's line. ``async with`` waits for the turn and holds it
    while the call runs; :meth:`abandon` gives the place up without running."""

    __slots__ = ("_entered", "_future", "session")

    def __init__(self, session: Session) -> None:
        self.session = session
        self._future = session._enqueue()
        self._entered = False

    def enter_now(self) -> Session | None:
        """Hold the turn if it is this call's already (no wait); else None: ``async with``."""
        return self._hold() if self._future is None else None

    async def __aenter__(self) -> Session:
        if self._future is not None:
            try:
                await self._future
            except BaseException:
                self.abandon()  # cancelled, perhaps just as the turn was handed over
                raise
        return self._hold()

    def _hold(self) -> Session:
        self._entered = True
        session = self.session
        session.active += 1
        session._holder = asyncio.current_task()
        return session

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.leave()

    def leave(self) -> None:
        """End the turn (what leaving ``async with`` does), from code that cannot await.
        A worker thread of the call that still runs (its tool timed out or was cancelled:
        a thread cannot be stopped) keeps the turn until it ends, so the next call of the
        session never runs beside it."""
        session = self.session
        session.active -= 1
        session._holder = None
        session.last_used = time.monotonic()
        thread, session._thread = session._thread, None
        if thread is not None and thread.then(session._release):
            return
        session._release()

    def abandon(self) -> None:
        """Give up the place without running (the call failed or was cancelled before its
        turn); a no-op once it has entered."""
        if self._entered:
            return
        self._entered = True
        future = self._future
        if future is None or (future.done() and not future.cancelled()):
            self.session._release()  # the turn was this call's: pass it on
        else:
            future.cancel()


class Worker:
    """A plain tool's run on a worker thread, as its session's turn sees it: the turn may
    end on the event loop while the thread still runs, and is then handed on only when the
    thread ends. Made on the loop, ended by the thread; a lock orders the two."""

    __slots__ = ("_after", "_ended", "_lock", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._ended = False
        self._after: list[Callable[[], None]] = []

    def ended(self) -> None:
        """The thread's last act: run what waits for it, on the loop."""
        with self._lock:
            self._ended = True
            after = self._after
        for callback in after:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nothing waits
                self._loop.call_soon_threadsafe(callback)

    def then(self, callback: Callable[[], None]) -> bool:
        """Run ``callback`` on the loop once the thread ends; False (not kept) if it has."""
        with self._lock:
            if self._ended:
                return False
            self._after.append(callback)
            return True

    async def wait(self) -> None:
        """Until the thread has ended."""
        done: asyncio.Future[None] = self._loop.create_future()
        if self.then(functools.partial(_resolve, done)):
            await done


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
