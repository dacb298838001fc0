"""``mesh.connect``: a handle on one agent, or on the whole mesh through its registry."""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

from sessionmesh.client._grpc import GrpcEndpoint
from sessionmesh.client._mesh import EndpointPool, MeshTransport, RegistryWatch
from sessionmesh.client._moves import Moved, move_sessions
from sessionmesh.client._proxy import (
    Proxy,
    StreamingProxy,
    make_proxy,
)
from sessionmesh.client._transport import Endpoint, EndpointTransport, Transport
from sessionmesh.client._typed import TypedProxy, tool_of
from sessionmesh.core._credentials import TLS, Credentials
from sessionmesh.core._dependency import Dependency
from sessionmesh.core._options import ProxyOptions
from sessionmesh.core.cli import DEFAULT_REGISTRY_PORT, REGISTRY_ENV
from sessionmesh.errors import UsageError
from sessionmesh.wire.codec import from_struct
from sessionmesh.wire.etcd import SCHEMES as ETCD_SCHEMES
from sessionmesh.wire.limits import DEFAULT_MAX_MESSAGE_BYTES

if TYPE_CHECKING:
    from types import TracebackType

    from sessionmesh.v1 import registry_service_pb2 as rpb
    from sessionmesh.v1 import session_service_pb2 as pb

_DEFAULTS = ProxyOptions()
#: Deadline of the client's own housekeeping RPCs (list tools, list sessions).
_ADMIN_TIMEOUT = 10.0


class _State(enum.Enum):
    OPEN = "open"
    CLOSED = "closed"


R = TypeVar("R")


def _options(options: ProxyOptions | None, changes: dict[str, Any]) -> ProxyOptions:
    base = options or _DEFAULTS
    return base.replace(**changes) if changes else base


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

    def _check_open(self) -> None:
        if self._state is _State.CLOSED:
            raise UsageError("this client is closed; connect again")

    @overload
    def proxy(
        self,
        tool: str,
        options: ProxyOptions | None = ...,
        *,
        streaming: Literal[True],
        **changes: Any,
    ) -> StreamingProxy: ...
    @overload
    def proxy(
        self,
        tool: str,
        options: ProxyOptions | None = ...,
        *,
        streaming: Literal[False] = ...,
        **changes: Any,
    ) -> Proxy: ...
    @overload
    def proxy(
        self,
        tool: Callable[..., Coroutine[Any, Any, R]],
        options: ProxyOptions | None = ...,
        **changes: Any,
    ) -> TypedProxy[R]: ...
    @overload
    def proxy(
        self, tool: Callable[..., R], options: ProxyOptions | None = ..., **changes: Any
    ) -> TypedProxy[R]: ...
    def proxy(
        self, tool: str | Callable[..., Any], options: ProxyOptions | None = None, **changes: Any
    ) -> Proxy | StreamingProxy:
        """A proxy for ``tool`` (function or capability name; or the provider's
        ``@mesh.tool`` function itself, for a typed result): ``options`` (or keywords
        changing them) as in :class:`ProxyOptions`."""
        self._check_open()
        opts = _options(options, changes)
        if callable(tool):
            return TypedProxy(self._transport, tool_of(tool, capability=False), opts, tool)
        return make_proxy(self._transport, tool, opts)

    async def list_tools(self) -> list[dict[str, Any]]:
        """The agent's tools: name, capability, description, schema, streaming, sessions."""
        self._check_open()
        response = await self._transport.pick().list_tools(_ADMIN_TIMEOUT)
        return [tool_info(t) for t in response.tools]

    async def list_sessions(self) -> pb.ListSessionsResponse:
        """The agent's open sessions (ids shortened), busy or idle, and its instance id."""
        self._check_open()
        return await self._transport.pick().list_sessions(_ADMIN_TIMEOUT)

    async def aclose(self) -> None:
        if self._state is _State.OPEN:
            self._state = _State.CLOSED
            await self._transport.aclose()  # closes its sessions, then its connections

    async def __aenter__(self) -> AgentClient:
        self._check_open()
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
        self,
        registry: str,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        tls: TLS | None = None,
        token: str | None = None,
    ) -> None:
        self.registry = registry
        self.credentials = Credentials(tls, token)
        self.watch = RegistryWatch(registry, self.credentials)
        self._pool = EndpointPool(self.watch, max_message_bytes)
        self._transports: dict[Dependency, MeshTransport] = {}
        self._state = _State.OPEN

    def _check_open(self) -> None:
        if self._state is _State.CLOSED:
            raise UsageError("this client is closed; connect again")

    @overload
    def proxy(
        self,
        capability: str | Dependency,
        options: ProxyOptions | None = ...,
        *,
        tags: Sequence[str] = ...,
        version: str | None = ...,
        streaming: Literal[True],
        **changes: Any,
    ) -> StreamingProxy: ...
    @overload
    def proxy(
        self,
        capability: str | Dependency,
        options: ProxyOptions | None = ...,
        *,
        tags: Sequence[str] = ...,
        version: str | None = ...,
        streaming: Literal[False] = ...,
        **changes: Any,
    ) -> Proxy: ...
    @overload
    def proxy(
        self,
        capability: Callable[..., Coroutine[Any, Any, R]],
        options: ProxyOptions | None = ...,
        *,
        tags: Sequence[str] = ...,
        version: str | None = ...,
        **changes: Any,
    ) -> TypedProxy[R]: ...
    @overload
    def proxy(
        self,
        capability: Callable[..., R],
        options: ProxyOptions | None = ...,
        *,
        tags: Sequence[str] = ...,
        version: str | None = ...,
        **changes: Any,
    ) -> TypedProxy[R]: ...
    def proxy(
        self,
        capability: str | Dependency | Callable[..., Any],
        options: ProxyOptions | None = None,
        *,
        tags: Sequence[str] = (),
        version: str | None = None,
        **changes: Any,
    ) -> Proxy | StreamingProxy:
        """A proxy for a capability (optionally narrowed by tags and a version constraint),
        for a :class:`Dependency`, or for the provider's ``@mesh.tool`` function itself (by
        its capability; the proxy's calls then return that function's type)."""
        self._check_open()
        typed = callable(capability) and not isinstance(capability, Dependency)
        if isinstance(capability, Dependency):
            dependency = capability
        else:
            name = tool_of(capability, capability=True) if callable(capability) else capability
            dependency = Dependency(name, tuple(tags), version)
        transport = self._transports.get(dependency)
        if transport is None:
            transport = self._transports[dependency] = MeshTransport(self._pool, dependency)
        opts = _options(options, changes)
        if typed:
            assert callable(capability)
            return TypedProxy(transport, dependency.capability, opts, capability)
        return make_proxy(transport, dependency.capability, opts)

    def instances(self) -> list[rpb.Instance]:
        """The instances the registry lists now."""
        return list(self.watch.instances.values())

    def instance(self, instance_id: str) -> rpb.Instance | None:
        """The instance with this id, if the registry lists it."""
        return self.watch.instances.get(instance_id)

    def providers(self, dependency: Dependency) -> list[rpb.Instance]:
        """The live, serving instances that provide ``dependency``."""
        return self.watch.providers(dependency)

    def endpoint(self, instance: rpb.Instance) -> Endpoint:
        """The client's shared connection to one listed instance."""
        self._check_open()
        return self._pool.get(instance)

    async def move_sessions(
        self, agent: str, to: str, *, count: int | None = None, session: str | None = None
    ) -> Moved:
        """Move sessions of ``agent`` from its other live replicas to instance ``to``: one
        ``session`` (its full id), ``count`` of them, or by default the target's fair share.
        Each moves between two calls; its callers are redirected and notice nothing."""
        return await move_sessions(self, agent, to, count=count, session=session)

    def agent(self, instance: rpb.Instance) -> AgentClient:
        """A client of one listed instance (its own connection; close it when done)."""
        self._check_open()
        return AgentClient(
            EndpointTransport(GrpcEndpoint(instance.endpoint, credentials=self.credentials))
        )

    async def ready(self, within: float = 5.0) -> None:
        """Wait for the registry's first answer (raises AgentUnavailable if none comes)."""
        await self.watch.ready(within)

    async def aclose(self) -> None:
        if self._state is _State.OPEN:
            self._state = _State.CLOSED
            transports, self._transports = self._transports, {}
            try:
                for transport in transports.values():
                    await transport.close_sessions()
            finally:  # whatever closing a session met, every connection is released
                await self._pool.aclose()
                await self.watch.aclose()

    async def __aenter__(self) -> MeshClient:
        self._check_open()
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
def connect(
    address: str,
    *,
    max_message_bytes: int = ...,
    tls: TLS | None = ...,
    token: str | None = ...,
) -> AgentClient: ...
@overload
def connect(
    *,
    registry: str | None = ...,
    max_message_bytes: int = ...,
    tls: TLS | None = ...,
    token: str | None = ...,
) -> MeshClient: ...
def connect(
    address: str | None = None,
    *,
    registry: str | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    tls: TLS | None = None,
    token: str | None = None,
) -> AgentClient | MeshClient:
    """Connect to one agent (``connect("host:port")``) or to the mesh through its registry
    (``connect(registry="host:port")``; with neither, the registry at
    ``$SESSIONMESH_REGISTRY``, else ``127.0.0.1:50050``, where ``sessionmesh run`` starts
    one). Call from async code; use ``async with``.

    ``tls`` dials over TLS (verifying servers against ``tls.ca``; with ``tls.cert`` and
    ``tls.key`` it also presents a client certificate); ``token`` is sent as
    ``authorization: Bearer <token>`` with every call, and only over TLS."""
    if address is not None and registry is not None:
        raise UsageError("connect() takes an agent address or registry=, not both")
    if address is None and registry is None:
        registry = default_registry()
    if registry is not None:
        where, tls = _dial(registry, tls)
        return MeshClient(where, max_message_bytes=max_message_bytes, tls=tls, token=token)
    assert address is not None
    where, tls = _dial(address, tls)
    endpoint = GrpcEndpoint(
        where, max_message_bytes=max_message_bytes, credentials=Credentials(tls, token)
    )
    return AgentClient(EndpointTransport(endpoint))


def default_registry() -> str:
    """The registry a client dials when told none: the one the CLI would use."""
    return os.environ.get(REGISTRY_ENV) or f"127.0.0.1:{DEFAULT_REGISTRY_PORT}"


def tool_info(t: pb.Tool) -> dict[str, Any]:
    """A tool as ListTools (or the registry) describes it, as plain data."""
    return {
        "name": t.name,
        "capability": t.capability,
        "description": t.description,
        "tags": list(t.tags),
        "version": t.version or None,
        "parameters": from_struct(t.parameters_schema),
        "output": from_struct(t.output_schema),
        "streaming": t.streaming,
        "session_required": t.session_required,
        "stateful": t.stateful,
    }


def host_port(address: str) -> str:
    """``host:port`` from ``host:port`` or a URL: ``http://``/``grpc://`` (the design note
    writes ``http://session-service:8080``) or ``https://``/``grpcs://``."""
    return _parse(address)[0]


def _parse(address: str) -> tuple[str, bool]:
    """The address and whether its scheme asks for TLS."""
    scheme, sep, rest = address.partition("://")
    if not sep:
        return address, False
    if scheme not in ("http", "grpc", "https", "grpcs"):
        raise UsageError(
            f"{address!r}: use host:port or a http://, grpc://, https:// or grpcs:// URL"
        )
    host = rest.rstrip("/")
    if "/" in host or ":" not in host:
        raise UsageError(f"{address!r}: give a host and a port, e.g. http://127.0.0.1:50051")
    return host, scheme in ("https", "grpcs")


def _dial(address: str, tls: TLS | None) -> tuple[str, TLS | None]:
    """The address to dial and the TLS to dial it with: an https:// URL without tls= means
    TLS verified against the system's roots; a plaintext URL with tls= is a contradiction."""
    if address.partition("://")[0] in ETCD_SCHEMES:
        return address, tls  # the mesh on etcd: its client reads the cluster directly
    host, secure = _parse(address)
    if secure and tls is None:
        return host, TLS()
    if "://" in address and not secure and tls is not None:
        raise UsageError(
            f"{address!r} is a plaintext URL but tls= is given: write https://{host} or host:port"
        )
    return host, tls
