"""An agent in this process behind the client's Endpoint seam: no sockets, no gRPC.

The agent's own runner runs the calls, as it does behind gRPC (sessions, ordering, call-id
memory, argument binding, timeouts, streams with flow control), so a proxy's session logic
can be tested against it in microseconds, with faults a test switches on: an unreachable
instance, an instance gone from the mesh.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectSendStream
from google.protobuf.struct_pb2 import Value

from sessionmesh.client import Answer, Endpoint, StreamCall, Transport
from sessionmesh.core._tasks import Tasks
from sessionmesh.errors import AgentUnavailable, RemoteError, SessionOwnerLost
from sessionmesh.server._agent import index_tools
from sessionmesh.server._declare import ToolSpec
from sessionmesh.server._dispatch import Plan
from sessionmesh.server._errors import Fail
from sessionmesh.server._inject import Injector
from sessionmesh.server._runner import Runner
from sessionmesh.server._sessions import SessionStore
from sessionmesh.v1 import session_service_pb2 as pb
from sessionmesh.wire.codec import from_value, set_value
from sessionmesh.wire.names import owner_of, short

log = logging.getLogger("sessionmesh.testing")

_END = object()


def _error(fail: Fail) -> RemoteError:
    return RemoteError.from_status(fail.code, fail.message, fail.details())


class MemoryEndpoint(Endpoint):
    """One in-process agent instance serving ``tools``.

    Set ``unreachable = True`` and every call fails as a dead connection would
    (AgentUnavailable), without reaching the agent. ``calls`` counts the calls that did.
    """

    def __init__(
        self,
        tools: Iterable[Callable[..., Any] | ToolSpec],
        *,
        instance_id: str = "mem0",
        session_ttl: float = 300.0,
        max_sessions: int = 100_000,
    ) -> None:
        self.address = f"memory:{instance_id}"
        self.instance_id = instance_id
        self.store = SessionStore(instance_id, default_ttl=session_ttl, max_sessions=max_sessions)
        self.runner = Runner(
            agent_name=instance_id,
            tools=index_tools(tools),
            store=self.store,
            injector=Injector(None),
        )
        self.unreachable = False
        self.calls = 0
        #: The streams running here: the endpoint ends them when it closes.
        self.streams = Tasks(f"memory endpoint {instance_id}", log)

    def _reach(self) -> None:
        if self.unreachable:
            raise AgentUnavailable(f"{self.address} is unreachable (injected)")
        self.calls += 1

    async def call(
        self, message: pb.ExchangeRequest, deadline: float | None, *, alone: bytes | None = None
    ) -> Answer:
        self._reach()
        try:
            plan = self.runner.plan(message.call, message.session_id, message.create_session)
        except Fail as fail:
            return Answer("", Value(), _error(fail))
        plan.expires_in(deadline)
        value = Value()
        try:
            async with asyncio.timeout(deadline):
                await self.runner.answer(plan, value)
            return Answer(plan.new_id, value, None)
        except Fail as fail:
            return Answer(plan.new_id, Value(), _error(fail))
        except BaseException:
            plan.abandon()
            raise

    def stream(
        self,
        session_id: str,
        create: bool,
        deadline: float | None,
        headers: Mapping[str, str] | None = None,
    ) -> StreamCall:
        return MemoryStreamCall(self, session_id, create, deadline)

    async def create_session(self, tool: str, deadline: float | None) -> str:
        self._reach()
        try:
            bound = self.runner.tool(tool) if tool else None
            return self.runner.new_session(bound).id
        except Fail as fail:
            raise _error(fail) from None

    async def close_session(self, session_id: str, deadline: float | None) -> bool:
        self._reach()
        return await self.store.close(session_id)

    async def list_tools(self, deadline: float | None) -> pb.ListToolsResponse:
        self._reach()
        names = self.runner.tool_names
        return pb.ListToolsResponse(
            agent_name=self.instance_id,
            instance_id=self.instance_id,
            tools=[pb.Tool(name=n) for n in names],
        )

    async def list_sessions(self, deadline: float | None) -> pb.ListSessionsResponse:
        self._reach()
        response = pb.ListSessionsResponse(instance_id=self.instance_id)
        for session in self.store.sessions():
            response.sessions.add(short_id=short(session.id), active=session.active > 0)
        return response

    async def aclose(self) -> None:
        await self.streams.aclose()
        await self.store.stop()


class MemoryStreamCall(StreamCall):
    def __init__(
        self, endpoint: MemoryEndpoint, session_id: str, create: bool, deadline: float | None
    ) -> None:
        self._endpoint = endpoint
        self._session = session_id
        self._create = create
        self._deadline = deadline
        self._out: asyncio.Queue[Any] | None = None
        self._inputs: MemoryObjectSendStream[Any] | None = None
        self._task: asyncio.Task[None] | None = None

    async def open(self, start: pb.StreamCallRequest) -> None:
        endpoint = self._endpoint
        endpoint._reach()
        try:
            plan = endpoint.runner.plan(start.start.call, self._session, self._create)
        except Fail as fail:
            raise _error(fail) from None
        self.session_id = plan.new_id or None
        plan.expires_in(self._deadline)
        bound = plan.bound
        # Chunks wait for the reader past buffer_size, as a flow-controlled StreamCall's do.
        self._out = asyncio.Queue(bound.spec.options.buffer_size)
        if bound.input_param:
            self._inputs, receive = anyio.create_memory_object_stream[Any](math.inf)
            plan.kwargs[bound.input_param] = receive
        self._task = endpoint.streams.start(self._run(plan))

    async def _run(self, plan: Plan) -> None:
        out = self._out
        assert out is not None
        try:
            async with asyncio.timeout(self._deadline):
                await self._endpoint.runner.stream(plan, _QueueSink(out))
        except Fail as fail:
            await out.put(_error(fail))
        except BaseException:
            plan.abandon()
            raise
        else:
            await out.put(_END)

    async def send(self, message: pb.StreamCallRequest) -> bool:
        if self._task is None or self._task.done():
            return False
        kind = message.WhichOneof("kind")
        if self._inputs is not None and kind == "input":
            with contextlib.suppress(anyio.ClosedResourceError):
                self._inputs.send_nowait(from_value(message.input))
        elif self._inputs is not None and kind == "input_end":
            self._inputs.close()
        return True  # credit: this stream has no window to replenish

    async def done_writing(self) -> None:
        if self._inputs is not None:
            self._inputs.close()

    async def messages(self) -> AsyncIterator[pb.StreamCallResponse]:
        out = self._out
        assert out is not None, "open() first"
        while (item := await out.get()) is not _END:
            if isinstance(item, RemoteError):
                raise item
            response = pb.StreamCallResponse()
            response.chunk.CopyFrom(item)
            yield response

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()


class _QueueSink:
    """A stream's chunks as the runner puts them, on the queue its reader takes them from."""

    __slots__ = ("_out",)

    def __init__(self, out: asyncio.Queue[Any]) -> None:
        self._out = out

    async def put(self, item: Any) -> None:
        value = Value()
        set_value(value, item)
        await self._out.put(value)

    async def flush(self) -> BaseException | None:
        return None


class MemoryTransport(Transport):
    """Instances of one agent, in this process: new sessions spread round-robin, each
    session's calls go to its owner. ``remove()`` takes an instance out of the mesh (its
    sessions then raise SessionOwnerLost, as with a registry that dropped it)."""

    def __init__(self, *endpoints: MemoryEndpoint) -> None:
        super().__init__()
        self.endpoints = {e.instance_id: e for e in endpoints}
        self._turns = itertools.count()

    def pick(self) -> Endpoint:
        live = list(self.endpoints.values())
        if not live:
            raise AgentUnavailable("no instance left in the memory mesh")
        return live[next(self._turns) % len(live)]

    def owner(self, session_id: str) -> Endpoint:
        endpoint = self.endpoints.get(owner_of(session_id))
        if endpoint is None:
            raise SessionOwnerLost(
                f"instance {owner_of(session_id)} is gone from the memory mesh",
                metadata={"session_id": session_id},
            )
        return endpoint

    def knows(self, endpoint: Endpoint) -> bool:
        return self.endpoints.get(endpoint.instance_id) is endpoint

    def remove(self, endpoint: MemoryEndpoint) -> None:
        self.endpoints.pop(endpoint.instance_id, None)

    async def aclose(self) -> None:
        await self.close_sessions()
        self.closed = True
        for endpoint in self.endpoints.values():
            await endpoint.aclose()
