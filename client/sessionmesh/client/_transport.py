"""Where calls go: the seam between proxies and agents.

An :class:`Endpoint` is one agent instance and the only way anything reaches it: the gRPC
one (``_grpc.py``) is the client's single edge to gRPC, and ``sessionmesh.testing`` ships
an in-memory one. A :class:`Transport` chooses endpoints: for a new session or a call
without one (``pick``), and the instance that owns an existing session (``owner``). One
address is the whole story for ``mesh.connect``; the mesh resolves through a registry.
"""

from __future__ import annotations

import abc
import asyncio
import weakref
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from sessionmesh.errors import SessionElsewhere, UsageError
from sessionmesh.wire.names import owner_of

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Mapping

    from google.protobuf.struct_pb2 import Value

    from sessionmesh.client._auto_session import AutoSession
    from sessionmesh.errors import RemoteError
    from sessionmesh.v1 import session_service_pb2 as pb

T = TypeVar("T")


class Answer(NamedTuple):
    """How a call ended, when it reached the agent."""

    #: The session the call opened (its id came back with the answer), or "".
    session_id: str
    value: Value
    #: The call's own failure, or None. Transport failures raise instead.
    error: RemoteError | None


class StreamCall(abc.ABC):
    """One StreamCall in flight. Errors arrive as sessionmesh errors."""

    #: The session the call opened (from the response headers), once known.
    session_id: str | None = None
    #: The window the agent granted (None: it granted none).
    window: int | None = None

    @abc.abstractmethod
    async def open(self, start: pb.StreamCallRequest) -> None:
        """Send ``start`` and wait for the response headers; a refusal raises."""

    @abc.abstractmethod
    async def send(self, message: pb.StreamCallRequest) -> bool:
        """Send one message; False if the call has ended (``receive`` tells how)."""

    @abc.abstractmethod
    async def done_writing(self) -> None:
        """Half-close; a no-op once the call has ended."""

    @abc.abstractmethod
    def messages(self) -> AsyncIterator[pb.StreamCallResponse]:
        """The call's messages (after ``open``), read as they come: nothing stands between
        the reader and the transport on this per-chunk path. A failure raises something
        that :meth:`failure` turns into a sessionmesh error."""

    def failure(self, exc: BaseException) -> BaseException:
        """What a failure raised by ``messages()`` means, as a sessionmesh error."""
        return exc

    @abc.abstractmethod
    def cancel(self) -> None:
        """Cancel the call (the tool is cancelled on the agent); idempotent."""


class Endpoint(abc.ABC):
    """One agent instance. Every method maps failures to sessionmesh errors."""

    address: str = ""
    instance_id: str = ""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.address}>"

    @abc.abstractmethod
    async def call(
        self, message: pb.ExchangeRequest, deadline: float | None, *, alone: bytes | None = None
    ) -> Answer:
        """Run one call. ``alone``: the call (``message.call``) encoded, when it is too big
        to share a stream with other calls: it is sent as it is, not encoded again."""

    @abc.abstractmethod
    def stream(
        self,
        session_id: str,
        create: bool,
        deadline: float | None,
        headers: Mapping[str, str] | None = None,
    ) -> StreamCall:
        """A StreamCall in ``session_id`` (or opening a session, or neither), not yet opened;
        ``headers`` travel with it (trace context)."""

    @abc.abstractmethod
    async def create_session(self, tool: str, deadline: float | None) -> str:
        """Open a session explicitly; its id."""

    @abc.abstractmethod
    async def close_session(self, session_id: str, deadline: float | None) -> bool:
        """Close a session; False if it was not open."""

    @abc.abstractmethod
    async def list_tools(self, deadline: float | None) -> pb.ListToolsResponse: ...

    @abc.abstractmethod
    async def list_sessions(self, deadline: float | None) -> pb.ListSessionsResponse: ...

    async def accept_session(self, request: pb.AcceptSessionRequest, deadline: float) -> None:
        """Agent to agent: hand a live session over to this instance."""
        raise UsageError("sessions move between agents served over gRPC only")

    async def move_sessions(
        self, request: pb.MoveSessionsRequest, deadline: float
    ) -> pb.MoveSessionsResponse:
        """Ask this instance to move sessions to another replica."""
        raise UsageError("sessions move between agents served over gRPC only")

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Let calls in flight finish (briefly), then release the connection."""


#: How many moves a close follows.
_CLOSE_HOPS = 4


class Transport(abc.ABC):
    """Chooses endpoints for calls. Implementations own their endpoints, and close the
    auto sessions opened through them (``close_sessions``) before closing those."""

    #: Set once the client that owns the endpoints closed them; proxies then refuse calls.
    closed = False

    def __init__(self) -> None:
        self._sessions: weakref.WeakSet[AutoSession] = weakref.WeakSet()
        #: Sessions that moved: session id -> the instance that owns it now (the one its id
        #: names is only where it began).
        self.homes: dict[str, str] = {}
        #: Sessions looked for on the replicas because their owner left (it may have handed
        #: them on): the instances that said "not here"; None once every one has.
        self.seeking: dict[str, set[str] | None] = {}
        #: The event loop it was made on: plain (``def``) tools, in worker threads, call
        #: their proxies through it.
        self.loop = asyncio._get_running_loop()

    def blocking(self, work: Coroutine[Any, Any, T]) -> T:
        """Run ``work`` on this transport's loop from another thread and wait for it: how a
        plain ``def`` tool calls its injected proxies without ``await``."""
        loop = self.loop
        if loop is None or loop.is_closed() or not loop.is_running():
            work.close()
            raise UsageError(
                "this proxy's event loop is not running: call it with `await` from async code"
            )
        return asyncio.run_coroutine_threadsafe(work, loop).result()

    def track(self, session: AutoSession) -> None:
        """An auto session is being opened through this transport."""
        self._sessions.add(session)

    async def close_sessions(self) -> None:
        """Close every auto session still open through this transport."""
        for session in list(self._sessions):
            await session.close(self)

    @abc.abstractmethod
    def pick(self) -> Endpoint:
        """An endpoint for a new session or a call without a session."""

    @abc.abstractmethod
    def owner(self, session_id: str) -> Endpoint:
        """The endpoint of the instance that owns ``session_id``."""

    def home(self, session_id: str) -> str:
        """The instance id of the session's owner, as far as this client knows."""
        return self.homes.get(session_id) or owner_of(session_id)

    def settle(self, session_id: str, endpoint: Endpoint) -> None:
        """A call in session ``session_id`` ran on ``endpoint``: its owner now."""
        instance = endpoint.instance_id
        self.seeking.pop(session_id, None)
        if instance and instance != self.home(session_id):
            if instance == owner_of(session_id):
                self.homes.pop(session_id, None)
            else:
                self.homes[session_id] = instance

    def moved(self, session_id: str, instance_id: str) -> None:
        """An agent said session ``session_id`` lives on another instance now."""
        if instance_id:
            self.homes[session_id] = instance_id
            self.seeking.pop(session_id, None)

    def not_here(self, session_id: str, instance_id: str) -> bool:
        """While the session is looked for, ``instance_id`` said it does not hold it: True
        to look on (the next replica), False when it was not being looked for."""
        tried = self.seeking.get(session_id)
        if tried is None:
            return False
        tried.add(instance_id)
        self.homes.pop(session_id, None)
        return True

    def seek(self, session_id: str, instance_id: str) -> bool:
        """Its owner ``instance_id`` stopped without running the call (it drains, or is
        gone): the session may have moved to another replica. True to look for it there."""
        return False

    async def close_session(self, session_id: str, deadline: float | None) -> bool:
        """Close a session where it lives, following it if it moved (a few hops at most)."""
        for _ in range(_CLOSE_HOPS):
            endpoint = self.owner(session_id)
            try:
                return await endpoint.close_session(session_id, deadline)
            except SessionElsewhere as moved:
                owner = moved.metadata.get("owner_instance", "")
                if not owner or owner == endpoint.instance_id:
                    raise
                self.moved(session_id, owner)
        return False

    def forget(self, session_id: str) -> None:
        """The session is closed: forget where it lived."""
        self.homes.pop(session_id, None)
        self.seeking.pop(session_id, None)

    def failed(self, endpoint: Endpoint) -> None:  # noqa: B027 - optional hook
        """A call could not reach ``endpoint``: try others first for a while."""

    def knows(self, endpoint: Endpoint) -> bool:
        """Whether ``endpoint``'s instance is still one this transport lists."""
        return True

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Close the endpoints."""


class EndpointTransport(Transport):
    """Everything goes to one endpoint."""

    def __init__(self, endpoint: Endpoint) -> None:
        super().__init__()
        self.endpoint = endpoint

    def pick(self) -> Endpoint:
        return self.endpoint

    def owner(self, session_id: str) -> Endpoint:
        return self.endpoint

    async def aclose(self) -> None:
        try:
            await self.close_sessions()
        finally:  # whatever closing a session met, the connection is released
            self.closed = True
            await self.endpoint.aclose()
