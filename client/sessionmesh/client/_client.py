"""``mesh.connect``: a handle on one agent over one reused channel."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, overload

import grpc

from sessionmesh.client._codec import from_struct
from sessionmesh.client._mesh import Dependency, EndpointPool, MeshTransport, RegistryWatch
from sessionmesh.client._proxy import Proxy, ProxyOptions
from sessionmesh.client._transport import DEFAULT_MAX_MESSAGE_BYTES, ChannelTransport, Transport
from sessionmesh.client.errors import UsageError, map_rpc_error
from sessionmesh.v1 import registry_service_pb2 as rpb
from sessionmesh.v1 import session_service_pb2 as pb

if TYPE_CHECKING:
    from types import TracebackType


_DEFAULTS = ProxyOptions()


class _State(enum.Enum):
    OPEN = "open"
    CLOSED = "closed"


class AgentClient:
    """A connection to one agent. Make proxies with :meth:`proxy`; close it when done.

    Example::

        async with mesh.connect("127.0.0.1:50051") as agent:
            counter = agent.proxy("session_counter", session_required=True)
            print(await counter(increment=1))
    """

    def __init__(self, transport: Transport) -> None:
        self._transport = transport
        self._state = _State.OPEN

    def proxy(self, tool: str, **options: Any) -> Proxy:
        """A proxy for ``tool`` (function or capability name); options as in ProxyOptions."""
        if self._state is _State.CLOSED:
            raise UsageError("this client is closed; connect again")
        opts = _DEFAULTS.replace(**options)
        return Proxy(self._transport, tool, opts)

    async def list_tools(self) -> list[dict[str, Any]]:
        """The agent's tools: name, capability, description, schema, streaming, sessions."""
        try:
            response = await self._transport.pick().stub.ListTools(
                pb.ListToolsRequest(), timeout=10
            )
        except grpc.aio.AioRpcError as exc:
            raise map_rpc_error(exc) from exc
        return [
            {
                "name": t.name,
                "capability": t.capability,
                "description": t.description,
                "tags": list(t.tags),
                "version": t.version or None,
                "parameters": from_struct(t.parameters_schema),
                "streaming": t.streaming,
                "session_required": t.session_required,
                "stateful": t.stateful,
            }
            for t in response.tools
        ]

    async def aclose(self) -> None:
        if self._state is _State.OPEN:
            self._state = _State.CLOSED
            await self._transport.aclose()

    async def __aenter__(self) -> AgentClient:
        if self._state is _State.CLOSED:
            raise UsageError("this client is closed; connect again")
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


class MeshClient:
    """A client of the whole mesh: proxies by capability, resolved through the registry.
    New sessions and session-less calls spread over the live instances; every call of a
    session goes to the instance that owns it.

    Example::

        async with mesh.connect(registry="127.0.0.1:50050") as client:
            async with client.proxy("session_counter", session_required=True) as counter:
                print(await counter(increment=1))
    """

    def __init__(
        self, registry: str, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    ) -> None:
        self.registry = registry
        self.watch = RegistryWatch(registry)
        self._pool = EndpointPool(self.watch, max_message_bytes)
        self._state = _State.OPEN

    def proxy(
        self,
        capability: str,
        *,
        tags: Sequence[str] = (),
        version: str | None = None,
        **options: Any,
    ) -> Proxy:
        """A proxy for a capability (optionally narrowed by tags and a version constraint)."""
        if self._state is _State.CLOSED:
            raise UsageError("this client is closed; connect again")
        opts = _DEFAULTS.replace(**options)
        dependency = Dependency(capability, tuple(tags), version)
        return Proxy(MeshTransport(self._pool, dependency), capability, opts)

    def instances(self) -> list[rpb.Instance]:
        """The instances the registry lists now."""
        return list(self.watch.instances.values())

    async def ready(self, within: float = 5.0) -> None:
        """Wait for the registry's first answer (raises AgentUnavailable if none comes)."""
        await self.watch.ready(within)

    async def aclose(self) -> None:
        if self._state is _State.OPEN:
            self._state = _State.CLOSED
            await self._pool.aclose()
            await self.watch.aclose()

    async def __aenter__(self) -> MeshClient:
        if self._state is _State.CLOSED:
            raise UsageError("this client is closed; connect again")
        try:
            await self.ready()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


@overload
def connect(address: str, *, max_message_bytes: int = ...) -> AgentClient: ...
@overload
def connect(*, registry: str, max_message_bytes: int = ...) -> MeshClient: ...
def connect(
    address: str | None = None,
    *,
    registry: str | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> AgentClient | MeshClient:
    """Connect to one agent (``connect("host:port")``) or to the mesh through its registry
    (``connect(registry="host:port")``). Call from async code; use ``async with``."""
    if (address is None) == (registry is None):
        raise UsageError("connect() takes an agent address or registry=, one of the two")
    if registry is not None:
        return MeshClient(registry, max_message_bytes=max_message_bytes)
    assert address is not None
    return AgentClient(ChannelTransport(address, max_message_bytes=max_message_bytes))
