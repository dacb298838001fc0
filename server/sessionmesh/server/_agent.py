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
from sessionmesh.core import Credentials
from sessionmesh.core._redact import guard_grpc_logs
from sessionmesh.errors import MeshError, UsageError
from sessionmesh.server import _recall as recall
from sessionmesh.server._declare import AGENT_ATTR, ToolSpec, spec_of, tools_in
from sessionmesh.server._durable import Durability
from sessionmesh.server._etcd import EtcdRegistration
from sessionmesh.server._handlers import add_to_server
from sessionmesh.server._inject import Injector, RegistryResolver, Resolver, StaticResolver
from sessionmesh.server._metrics import AgentMetrics
from sessionmesh.server._move import Mover
from sessionmesh.server._records import StoreUnavailable, check_url, open_records
from sessionmesh.server._registration import Registration
from sessionmesh.server._runner import Runner
from sessionmesh.server._security import Authenticator, bind
from sessionmesh.server._service import Servicer
from sessionmesh.server._sessions import SessionStore
from sessionmesh.server._settings import AgentSettings
from sessionmesh.server._standard import StandardServices
from sessionmesh.server._tool import BoundTool, each_once
from sessionmesh.v1 import registry_service_pb2 as rpb
from sessionmesh.v1 import session_service_pb2 as pb
from sessionmesh.wire.limits import (
    server_options,
)
from sessionmesh.wire.names import names

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence

log = logging.getLogger("sessionmesh.agent")

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
        settings: AgentSettings | None = None,
        /,
        *,
        resolver: Resolver | None = None,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        **changes: Any,
    ) -> None:
        """``settings`` (or keywords: the fields of :class:`AgentSettings`, which override
        it) say how it serves; ``resolver`` finds its dependencies when neither peers nor a
        registry do; ``interceptors`` see every RPC."""
        self.settings = s = (settings or AgentSettings()).replace(**changes)
        if s.session_store is not None:
            check_url(s.session_store, insecure=s.insecure)
        self.metrics: AgentMetrics | None = None
        #: What this agent dials its registry and its dependencies with.
        self.credentials = Credentials(s.tls, s.token)
        self.auth = Authenticator.serving(s.tls, s.auth_tokens, s.authenticate, s.admins)
        self.port = s.port  # the bound one once started
        self.instance_id = secrets.token_hex(4)
        self.tools = index_tools(tools)
        guarded = sorted({b.spec.name for b in self.tools.values() if b.spec.allow is not None})
        if guarded and not self.auth.on:
            raise UsageError(
                f"tool(s) {', '.join(guarded)} have allow= lists, but this agent does not know "
                "who calls it: give it --tls-client-ca (client certificates), --auth-tokens "
                "or authenticate="
            )
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        peers = dict(s.peers) if s.peers else None
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
        """The agent a module declares: its ``@mesh.tool`` functions, its ``@mesh.agent``
        settings (named after the module without one), changed by ``overrides``."""
        namespace = vars(module) if isinstance(module, ModuleType) else module
        settings = AgentSettings()
        if isinstance(module, ModuleType):
            settings = settings.replace(name=module.__name__.rpartition(".")[2])
        for obj in namespace.values():
            if isinstance(obj, type) and isinstance(vars(obj).get(AGENT_ATTR), AgentSettings):
                settings = vars(obj)[AGENT_ATTR]
        tools = tools_in(namespace)
        if not tools:
            raise UsageError("no @mesh.tool functions found")
        return cls(tools, settings, **overrides)

    @property
    def address(self) -> str:
        if self._server is None:
            raise UsageError("the agent is not started")
        return f"{self.host}:{self.port}"

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def host(self) -> str:
        return self.settings.host

    async def registered(self, within: float) -> bool:
        """Whether the agent is in its registry, waiting up to ``within`` seconds for it
        (True at once without a registry: nothing to wait for). Why it is not, meanwhile,
        the agent logs at WARNING."""
        registration = self._registration
        if registration is None:
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(registration.registered.wait(), within)
        return registration.registered.is_set()

    @property
    def endpoint(self) -> str:
        """The address others dial (what the registry lists): ``advertise`` (its port the
        bound one when it names none), else the bound address; a wildcard bind (0.0.0.0)
        is never advertised as such, but as this host's name."""
        if self.settings.advertise:
            _, sep, port = self.settings.advertise.rpartition(":")
            return (
                self.settings.advertise
                if sep and port.isdigit()
                else f"{self.settings.advertise}:{self.port}"
            )
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
        guard_grpc_logs()  # grpc's own logs quote headers: no session id may reach them
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
            default_ttl=self.settings.session_ttl,
            max_sessions=self.settings.max_sessions,
            max_per_principal=self.settings.max_sessions_per_principal,
            hibernate_after=self.settings.hibernate_after,
            max_live=self.settings.max_live_sessions,
        )
        self._executor = concurrent.futures.ThreadPoolExecutor(
            self.settings.threads, thread_name_prefix=f"sessionmesh-{self.name}"
        )
        for bound in self.tools.values():
            bound.executor = self._executor
        if self.settings.registry is not None:
            self.mesh = MeshClient(
                self.settings.registry,
                max_message_bytes=self.settings.max_message_bytes,
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
            debug=self.settings.debug,
            locate=self._locate,
            recall=recall.Recall(self.settings.remembered_calls, self.settings.remembered_bytes),
            durability=(
                Durability(
                    open_records(self.settings.session_store, self.name, self.settings.tls),
                    self._store,
                    self._locate,
                )
                if self.settings.session_store is not None
                else None
            ),
        )
        self._servicer = Servicer(self._runner, self.auth, self.settings.max_calls_per_stream)
        self._servicer.mover = Mover(self._runner, self.mesh, self._locate, self.settings.grace)
        if self.settings.metrics_port is not None:
            exchanges = self._servicer.exchanges
            durability = self._runner.durability
            self.metrics = AgentMetrics(
                self._store,
                lambda: len(exchanges),
                durability.calls if durability is not None else None,
            )
            self.metrics.serve(
                self.host,
                self.settings.metrics_port,
                self.settings.tls,
                insecure=self.settings.insecure,
            )
            self._runner.metrics = self.metrics
        server = grpc.aio.server(
            options=server_options(
                self.settings.max_message_bytes, self.settings.max_streams_per_connection
            ),
            interceptors=self._interceptors,
        )
        add_to_server(self._servicer, server)
        self._health = StandardServices(server, SERVICE_NAME)
        self.port = bind(
            server, self.host, self.port, self.settings.tls, insecure=self.settings.insecure
        )
        await server.start()
        self._server = server
        self._store.start()
        await self._health.serving()
        if self.settings.registry is not None:
            assert self.mesh is not None
            on_etcd = self.settings.on_etcd
            self._registration = (
                EtcdRegistration(
                    on_etcd,
                    self._describe,
                    self._declared_lost,
                    self.credentials,
                    self.settings.lease,
                )
                if on_etcd is not None
                else Registration(
                    self.settings.registry,
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
                    where = f"no agent in the registry at {self.settings.registry} provides it yet"
                elif self.settings.peers is not None:
                    if dependency.capability in self.settings.peers:
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
        await self._hand_over()
        log.info("agent %s draining: %d open session(s)", self.name, len(self._store))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                self._store.empty.wait(), self.settings.drain_timeout if within is None else within
            )

    async def _hand_over(self) -> None:
        """Take no new sessions (the registry hears this instance drains, and health says
        not serving), then move the open sessions to the other serving replicas, if any."""
        assert self._runner is not None
        assert self._servicer is not None
        if not self._runner.draining:
            self._runner.draining = True
            if self._registration is not None:
                self._registration.nudge()
            if self._health is not None:
                await self._health.not_serving()
        if self._servicer.mover is not None:
            await self._servicer.mover.drain()

    async def stop(self, grace: float | None = None) -> None:
        """Stop gracefully: no new calls or sessions, in-flight calls get ``grace`` seconds to
        finish, then every open session is closed and its close callbacks run."""
        server = self._server
        if server is None:
            return
        assert self._servicer is not None
        assert self._store is not None
        assert self._health is not None
        await self._hand_over()
        self._servicer.drain()
        await self._health.not_serving()
        if self._registration is not None:
            await self._registration.stop()
        await server.stop(self.settings.grace if grace is None else grace)
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
