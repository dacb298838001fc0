"""An agent: a gRPC server for a set of tools, with sessions, reflection and health."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import secrets
import socket
from types import ModuleType, TracebackType
from typing import TYPE_CHECKING, Any

import grpc

from sessionmesh.client import MeshClient
from sessionmesh.core import TLS, Credentials
from sessionmesh.errors import MeshError, UsageError
from sessionmesh.server import _recall as recall
from sessionmesh.server._declare import AGENT_ATTR, ToolSpec, spec_of, tools_in
from sessionmesh.server._durable import Durability
from sessionmesh.server._etcd import EtcdRegistration
from sessionmesh.server._handlers import add_to_server
from sessionmesh.server._inject import Injector, RegistryResolver, Resolver, StaticResolver
from sessionmesh.server._metrics import AgentMetrics
from sessionmesh.server._records import StoreUnavailable, check_url, open_records
from sessionmesh.server._registration import Registration
from sessionmesh.server._runner import Runner
from sessionmesh.server._security import Authenticator, Verifier, bind
from sessionmesh.server._service import Servicer
from sessionmesh.server._session import SessionStore
from sessionmesh.server._standard import StandardServices
from sessionmesh.server._tool import BoundTool, each_once
from sessionmesh.v1 import registry_service_pb2 as rpb
from sessionmesh.v1 import session_service_pb2 as pb
from sessionmesh.wire import etcd
from sessionmesh.wire.limits import (
    DEFAULT_MAX_CALLS_PER_STREAM,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MAX_STREAMS_PER_CONNECTION,
    server_options,
)
from sessionmesh.wire.names import names

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence

log = logging.getLogger("sessionmesh.agent")

#: Threads for plain (``def``) tools, per agent: how many can block at once.
DEFAULT_THREADS = 32
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SessionService"].full_name


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
        registry: str | None = None,
        advertise: str | None = None,
        drain_timeout: float = 30.0,
        threads: int = DEFAULT_THREADS,
        remembered_calls: int = recall.MAX_CALLS,
        remembered_bytes: int = recall.MAX_BYTES,
        resolver: Resolver | None = None,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        tls: TLS | None = None,
        insecure: bool = False,
        token: str | None = None,
        auth_tokens: str | Mapping[str, str] | None = None,
        authenticate: Verifier | None = None,
        admins: Iterable[str] = (),
        max_sessions_per_principal: int | None = None,
        max_streams_per_connection: int = DEFAULT_MAX_STREAMS_PER_CONNECTION,
        max_calls_per_stream: int = DEFAULT_MAX_CALLS_PER_STREAM,
        lost_after: float | None = None,
        metrics_port: int | None = None,
        session_store: str | None = None,
    ) -> None:
        if session_ttl <= 0:
            raise UsageError("session_ttl must be > 0 seconds")
        if max_sessions < 1:
            raise UsageError("max_sessions must be >= 1")
        if threads < 1:
            raise UsageError("threads must be >= 1 (plain def tools run in them)")
        if remembered_calls < 0 or remembered_bytes < 0:
            raise UsageError("remembered_calls and remembered_bytes must be >= 0")
        if max_sessions_per_principal is not None and max_sessions_per_principal < 1:
            raise UsageError("max_sessions_per_principal must be >= 1, or None")
        if max_streams_per_connection < 1 or max_calls_per_stream < 1:
            raise UsageError("max_streams_per_connection and max_calls_per_stream must be >= 1")
        self.max_streams_per_connection = max_streams_per_connection
        self.max_calls_per_stream = max_calls_per_stream
        try:
            on_etcd = etcd.parse(registry) if registry else None
        except etcd.EtcdAddressError as exc:
            raise UsageError(str(exc)) from None
        if lost_after is not None and on_etcd is None:
            raise UsageError(
                "lost_after (--lost-after) is the etcd lease of an agent registered in etcd; "
                "a registry process has its own (sessionmesh registry --lost-after)"
            )
        #: With etcd: the lease TTL, after which an agent that stopped answering is lost.
        self.lost_after = 5.0 if lost_after is None else lost_after
        #: Serve Prometheus metrics on this port of ``host`` (0: a free one); None: off.
        self.metrics_port = metrics_port
        #: Durable sessions: kept in this store (``redis://HOST:PORT/DB``), they outlive
        #: this instance. None: sessions live in this process only.
        self.session_store = session_store or None
        if self.session_store is not None:
            check_url(self.session_store, insecure=insecure)
        self.metrics: AgentMetrics | None = None
        #: What this agent dials its registry and its dependencies with.
        self.credentials = Credentials(tls, token)
        self.tls = tls
        self.insecure = insecure
        self.auth = Authenticator.serving(tls, auth_tokens, authenticate, admins)
        self.max_sessions_per_principal = max_sessions_per_principal
        self.name = name
        self.host = host
        self.port = port
        self.session_ttl = session_ttl
        self.max_sessions = max_sessions
        self.grace = grace
        self.debug = debug
        self.max_message_bytes = max_message_bytes
        self.instance_id = secrets.token_hex(4)
        self.tools = index_tools(tools)
        guarded = sorted({b.spec.name for b in self.tools.values() if b.spec.allow is not None})
        if guarded and not self.auth.on:
            raise UsageError(
                f"tool(s) {', '.join(guarded)} have allow= lists, but this agent does not know "
                "who calls it: give it --tls-client-ca (client certificates), --auth-tokens "
                "or authenticate="
            )
        self.registry = registry
        self.advertise = advertise
        self.drain_timeout = drain_timeout
        self.threads = threads
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self.remembered_calls = remembered_calls
        self.remembered_bytes = remembered_bytes
        if peers and registry:
            raise UsageError("give peers or a registry, not both")
        self.peers = dict(peers) if peers else None
        self._custom_resolver = resolver is not None
        self._resolver = resolver or (StaticResolver(peers) if peers else None)
        #: The agent's own client of the mesh (with a registry): dependencies, owners.
        self.mesh: MeshClient | None = None
        self._registration: Registration | EtcdRegistration | None = None
        self._interceptors = tuple(interceptors)
        self._server: grpc.aio.Server | None = None
        self._store: SessionStore | None = None
        self._runner: Runner | None = None
        self._servicer: Servicer | None = None
        self._injector: Injector | None = None
        self._health: StandardServices | None = None

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
            raise UsageError("no @mesh.tool functions found")
        return cls(tools, **settings)

    @property
    def address(self) -> str:
        if self._server is None:
            raise UsageError("the agent is not started")
        return f"{self.host}:{self.port}"

    @property
    def endpoint(self) -> str:
        """The address others dial (what the registry lists): ``advertise`` (its port the
        bound one when it names none), else the bound address; a wildcard bind (0.0.0.0)
        is never advertised as such, but as this host's name."""
        if self.advertise:
            _, sep, port = self.advertise.rpartition(":")
            return self.advertise if sep and port.isdigit() else f"{self.advertise}:{self.port}"
        if self.host in ("0.0.0.0", "::", ""):  # a check, not a bind
            return f"{socket.gethostname()}:{self.port}"
        return self.address

    @property
    def sessions(self) -> SessionStore:
        if self._store is None:
            raise UsageError("the agent is not started")
        return self._store

    async def start(self) -> str:
        """Bind and start serving; returns ``host:port``. A start that fails (a port in
        use, say) leaves nothing running: the agent may be started again."""
        if self._server is not None:
            raise UsageError("the agent is already started")
        try:
            return await self._start()
        except BaseException:
            if self._server is not None:
                await self.stop(0)  # serving already (registering failed, say)
            else:
                await self._release()
            self.mesh, self.metrics = None, None
            raise

    async def _start(self) -> str:
        self._store = SessionStore(
            self.instance_id,
            default_ttl=self.session_ttl,
            max_sessions=self.max_sessions,
            max_per_principal=self.max_sessions_per_principal,
        )
        self._executor = concurrent.futures.ThreadPoolExecutor(
            self.threads, thread_name_prefix=f"sessionmesh-{self.name}"
        )
        for bound in self.tools.values():
            bound.executor = self._executor
        if self.registry is not None:
            self.mesh = MeshClient(
                self.registry,
                max_message_bytes=self.max_message_bytes,
                tls=self.credentials.tls,
                token=self.credentials.token,
            )
        resolver = self._resolver
        if resolver is None and self.mesh is not None:
            resolver = RegistryResolver(self.mesh)
        self._injector = Injector(resolver)
        self._runner = Runner(
            agent_name=self.name,
            tools=self.tools,
            store=self._store,
            injector=self._injector,
            debug=self.debug,
            locate=self._locate,
            recall=recall.Recall(self.remembered_calls, self.remembered_bytes),
            durability=(
                Durability(
                    open_records(self.session_store, self.name, self.tls),
                    self._store,
                    self._locate,
                )
                if self.session_store is not None
                else None
            ),
        )
        self._servicer = Servicer(self._runner, self.auth, self.max_calls_per_stream)
        if self.metrics_port is not None:
            exchanges = self._servicer.exchanges
            durability = self._runner.durability
            self.metrics = AgentMetrics(
                self._store,
                lambda: len(exchanges),
                durability.calls if durability is not None else None,
            )
            self.metrics.serve(self.host, self.metrics_port, self.tls, insecure=self.insecure)
            self._runner.metrics = self.metrics
        server = grpc.aio.server(
            options=server_options(self.max_message_bytes, self.max_streams_per_connection),
            interceptors=self._interceptors,
        )
        add_to_server(self._servicer, server)
        self._health = StandardServices(server, SERVICE_NAME)
        self.port = bind(server, self.host, self.port, self.tls, insecure=self.insecure)
        await server.start()
        self._server = server
        self._store.start()
        await self._health.serving()
        if self.registry is not None:
            assert self.mesh is not None
            on_etcd = etcd.parse(self.registry)
            self._registration = (
                EtcdRegistration(
                    on_etcd, self._describe, self._declared_lost, self.credentials, self.lost_after
                )
                if on_etcd is not None
                else Registration(
                    self.registry,
                    self._describe,
                    self._heartbeat,
                    self._declared_lost,
                    self.credentials,
                )
            )
            self._registration.start()
            # Dependencies resolve better with a first view of the mesh; a registry that
            # is down just means none yet (the watch keeps trying).
            with contextlib.suppress(MeshError):
                await self.mesh.ready(within=2.0)
        durability = self._runner.durability
        if durability is not None:
            # A store that is down is no reason not to serve (calls without a session work,
            # and it may come back), but say so now rather than at the first session call.
            try:
                await durability.records.ping()
            except StoreUnavailable as exc:
                log.warning(
                    "calls in sessions fail with SessionStoreUnavailable until the store "
                    "answers: %s",
                    exc,
                )
        self._say_what_is_missing()
        log.info("agent %s (instance %s) serving on %s", self.name, self.instance_id, self.address)
        return self.address

    def _say_what_is_missing(self) -> None:
        """Log each dependency no provider answers for yet: its parameter gets None."""
        for bound in each_once(self.tools):
            for dependency in bound.spec.dependencies:
                if self.mesh is not None:
                    if self.mesh.providers(dependency):
                        continue
                    where = f"no agent in the registry at {self.registry} provides it yet"
                elif self.peers is not None:
                    if dependency.capability in self.peers:
                        continue
                    where = "no --peer (peers=) names it"
                elif not self._custom_resolver:
                    where = "the agent has no registry and no peers to find it"
                else:
                    continue  # a resolver of the caller's own: it knows
                log.warning(
                    "tool %s depends on %r: %s; it gets None until one does",
                    bound.spec.name,
                    dependency.capability,
                    where,
                )

    def _describe(self) -> rpb.Instance:
        assert self._servicer is not None
        return rpb.Instance(
            instance_id=self.instance_id,
            agent_name=self.name,
            endpoint=self.endpoint,
            tools=self._servicer.tool_descriptions,
            state=self._state(),
            open_sessions=len(self._store or ()),
        )

    def _state(self) -> rpb.InstanceState.ValueType:
        draining = self._runner is not None and self._runner.draining
        return rpb.INSTANCE_STATE_DRAINING if draining else rpb.INSTANCE_STATE_SERVING

    def _heartbeat(self) -> rpb.Heartbeat:
        return rpb.Heartbeat(state=self._state(), open_sessions=len(self._store or ()))

    async def _declared_lost(self) -> None:
        if self._store is not None:
            await self._store.close_all(why="closed: the registry declared this instance lost")

    def _locate(self, instance_id: str) -> str | None:
        instance = self.mesh.instance(instance_id) if self.mesh else None
        return instance.endpoint if instance is not None else None

    async def drain(self, within: float | None = None) -> None:
        """Take no new sessions (the registry marks this instance draining, so callers go
        elsewhere) and wait up to ``within`` (``drain_timeout``) for open sessions to close.
        Calls in open sessions, and calls without one, are still served."""
        if self._runner is None or self._store is None:
            return
        self._runner.draining = True
        if self._registration is not None:
            self._registration.nudge()
        if self._health is not None:
            await self._health.not_serving()
        log.info("agent %s draining: %d open session(s)", self.name, len(self._store))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                self._store.empty.wait(), self.drain_timeout if within is None else within
            )

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
        await self._health.not_serving()
        if self._registration is not None:
            await self._registration.stop()
        await server.stop(self.grace if grace is None else grace)
        await self._release()
        self._server = None
        log.info("agent %s (instance %s) stopped", self.name, self.instance_id)

    async def _release(self) -> None:
        """Free what starting made, in order: calls, sessions, the store, dependencies,
        the mesh client, tool threads, the metrics port (also after a failed start)."""
        runner = self._runner
        if runner is not None:
            await runner.stop()
        if self._store is not None:
            await self._store.stop()
        if runner is not None and runner.durability is not None:
            await runner.durability.stop()
        if self._injector is not None:
            await self._injector.aclose()
        if self.mesh is not None:
            await self.mesh.aclose()
        if self._executor is not None:
            # Tools still running in a thread cannot be stopped; do not wait for them.
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        if self.metrics is not None:
            self.metrics.stop()

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


def index_tools(tools: Iterable[Callable[..., Any] | ToolSpec]) -> dict[str, BoundTool]:
    """Tools by function name and by capability; a name may mean only one tool."""
    index: dict[str, BoundTool] = {}
    for item in tools:
        spec = item if isinstance(item, ToolSpec) else spec_of(item)
        if spec is None:
            raise UsageError(f"{item!r} is not a tool: decorate it with @mesh.tool")
        bound = BoundTool(spec)
        for key in names(spec):
            other = index.get(key)
            if other is not None and other is not bound:
                raise UsageError(
                    f"two tools answer to {key!r}: {other.spec.fn.__qualname__} and "
                    f"{spec.fn.__qualname__}; give one another name or capability"
                )
            index[key] = bound
    if not index:
        raise UsageError("an agent needs at least one tool")
    return index
