"""An agent: a gRPC server for a set of tools, with sessions, reflection and health."""

from __future__ import annotations

import logging
import secrets
from types import ModuleType, TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sessionmesh.client._transport import DEFAULT_MAX_MESSAGE_BYTES, channel_options
from sessionmesh.server._inject import Injector, Resolver, StaticResolver
from sessionmesh.server._service import Servicer
from sessionmesh.server._session import SessionStore
from sessionmesh.server._tool import BoundTool, ToolSpec, spec_of, tools_in
from sessionmesh.v1 import session_service_pb2 as pb
from sessionmesh.v1 import session_service_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence

log = logging.getLogger("sessionmesh.agent")

AGENT_ATTR = "__sessionmesh_agent__"
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SessionService"].full_name

C = TypeVar("C", bound=type)


def agent(name: str | None = None, **settings: Any) -> Callable[[C], C]:
    """Name the agent a file defines and set how it serves (``host``, ``port``,
    ``session_ttl``, ``max_sessions``, ``grace``, ``debug``, ``max_message_bytes``, ``peers``).

    Example::

        @mesh.agent(name="counter", port=50051, session_ttl=60)
        class Counter: ...
    """
    unknown = set(settings) - _AGENT_SETTINGS
    if unknown:
        raise TypeError(f"unknown @mesh.agent setting(s): {', '.join(sorted(unknown))}")

    def decorate(cls: C) -> C:
        setattr(cls, AGENT_ATTR, {"name": name or cls.__name__, **settings})
        return cls

    return decorate


_AGENT_SETTINGS = {
    "host",
    "port",
    "session_ttl",
    "max_sessions",
    "grace",
    "debug",
    "max_message_bytes",
    "peers",
}


class Agent:
    """Serves tools over gRPC on ``host:port`` (127.0.0.1 and a free port by default).

    Example::

        async with Agent([increment], name="counter") as running:
            async with mesh.connect(running.address) as client:
                ...
    """

    def __init__(
        self,
        tools: Iterable[Callable[..., Any] | ToolSpec],
        *,
        name: str = "agent",
        host: str = "127.0.0.1",
        port: int = 0,
        session_ttl: float = 300.0,
        max_sessions: int = 100_000,
        grace: float = 5.0,
        debug: bool = False,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        peers: Mapping[str, str] | None = None,
        resolver: Resolver | None = None,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    ) -> None:
        if session_ttl <= 0:
            raise ValueError("session_ttl must be > 0 seconds")
        if max_sessions < 1:
            raise ValueError("max_sessions must be >= 1")
        self.name = name
        self.host = host
        self.port = port
        self.session_ttl = session_ttl
        self.max_sessions = max_sessions
        self.grace = grace
        self.debug = debug
        self.max_message_bytes = max_message_bytes
        self.instance_id = secrets.token_hex(4)
        self.tools = _index(tools)
        self._resolver = resolver or (StaticResolver(peers) if peers else None)
        self._interceptors = tuple(interceptors)
        self._server: grpc.aio.Server | None = None
        self._store: SessionStore | None = None
        self._servicer: Servicer | None = None
        self._injector: Injector | None = None
        self._health: health.aio.HealthServicer | None = None

    @classmethod
    def from_module(cls, module: ModuleType | Mapping[str, Any], **overrides: Any) -> Agent:
        """The agent a module declares: its ``@mesh.tool`` functions, ``@mesh.agent`` settings."""
        namespace = vars(module) if isinstance(module, ModuleType) else module
        settings: dict[str, Any] = {}
        for obj in namespace.values():
            if isinstance(obj, type) and AGENT_ATTR in vars(obj):
                settings = dict(getattr(obj, AGENT_ATTR))
        if "name" not in settings and isinstance(module, ModuleType):
            settings["name"] = module.__name__.rpartition(".")[2]
        settings.update({k: v for k, v in overrides.items() if v is not None})
        tools = tools_in(namespace)
        if not tools:
            raise ValueError("no @mesh.tool functions found")
        return cls(tools, **settings)

    @property
    def address(self) -> str:
        if self._server is None:
            raise RuntimeError("the agent is not started")
        return f"{self.host}:{self.port}"

    @property
    def sessions(self) -> SessionStore:
        if self._store is None:
            raise RuntimeError("the agent is not started")
        return self._store

    async def start(self) -> str:
        """Bind and start serving; returns ``host:port``."""
        if self._server is not None:
            raise RuntimeError("the agent is already started")
        self._store = SessionStore(
            self.instance_id, default_ttl=self.session_ttl, max_sessions=self.max_sessions
        )
        self._injector = Injector(self._resolver)
        self._servicer = Servicer(
            agent_name=self.name,
            tools=self.tools,
            store=self._store,
            injector=self._injector,
            debug=self.debug,
        )
        server = grpc.aio.server(
            options=channel_options(self.max_message_bytes), interceptors=self._interceptors
        )
        pb_grpc.add_SessionServiceServicer_to_server(self._servicer, server)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        self.port = server.add_insecure_port(f"{self.host}:{self.port}")
        await server.start()
        self._server = server
        self._store.start()
        for service in ("", SERVICE_NAME):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("agent %s (instance %s) serving on %s", self.name, self.instance_id, self.address)
        return self.address

    async def stop(self, grace: float | None = None) -> None:
        """Stop gracefully: no new calls or sessions, in-flight calls get ``grace`` seconds to
        finish, then every open session is closed and its close callbacks run."""
        server = self._server
        if server is None:
            return
        assert self._servicer is not None
        assert self._store is not None
        assert self._health is not None
        self._servicer.drain()
        await self._health.enter_graceful_shutdown()
        await server.stop(self.grace if grace is None else grace)
        await self._store.stop()
        if self._injector is not None:
            await self._injector.aclose()
        self._server = None
        log.info("agent %s (instance %s) stopped", self.name, self.instance_id)

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def __aenter__(self) -> Agent:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


def _index(tools: Iterable[Callable[..., Any] | ToolSpec]) -> dict[str, BoundTool]:
    """Tools by function name and by capability; a name may mean only one tool."""
    index: dict[str, BoundTool] = {}
    for item in tools:
        spec = item if isinstance(item, ToolSpec) else spec_of(item)
        if spec is None:
            raise TypeError(f"{item!r} is not a tool: decorate it with @mesh.tool")
        bound = BoundTool(spec)
        for key in {spec.name, spec.capability}:
            other = index.get(key)
            if other is not None and other is not bound:
                raise ValueError(
                    f"two tools answer to {key!r}: {other.spec.fn.__qualname__} and "
                    f"{spec.fn.__qualname__}; give one another name or capability"
                )
            index[key] = bound
    if not index:
        raise ValueError("an agent needs at least one tool")
    return index
