"""The registry: which agent instances are alive, and what they provide.

An instance is registered exactly as long as its Register stream lives and heartbeats
arrive within the lease: a killed agent's stream breaks at once on the same host, its lease
runs out elsewhere. Instances live in a RegistryStore; the in-memory one is the default, and
a store on a distributed database (etcd) implements the same four methods and one feed.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from types import TracebackType
from typing import Any, TypeVar

import anyio
import grpc

from sessionmesh.core import TLS
from sessionmesh.core._redact import guard_grpc_logs
from sessionmesh.core._tasks import beside, race
from sessionmesh.errors import UsageError
from sessionmesh.server._errors import Fail, invalid_stream
from sessionmesh.server._metrics import RegistryMetrics
from sessionmesh.server._security import (
    Authenticator,
    Verifier,
    bind,
    denied,
    read_registrants,
)
from sessionmesh.server._standard import StandardServices
from sessionmesh.v1 import registry_service_pb2 as rpb
from sessionmesh.v1 import registry_service_pb2_grpc as rpb_grpc
from sessionmesh.wire.limits import server_options
from sessionmesh.wire.names import answers_to
from sessionmesh.wire.reasons import Reason

log = logging.getLogger("sessionmesh.registry")

SERVICE_NAME = rpb.DESCRIPTOR.services_by_name["RegistryService"].full_name
#: An instance that sends nothing for this long is unreachable (it heartbeats every third).
LEASE_MS = 1000
#: An unreachable instance (stream open, heartbeats missing) is removed after this long,
#: and its sessions are then lost; a pause shorter than this costs nothing.
LOST_AFTER = 5.0
#: How many instance ids declared lost the registry remembers, to tell them if they return.
REMEMBER_LOST = 10_000

Change = rpb.WatchResponse.Change
Event = tuple["rpb.WatchResponse.Change.ValueType", rpb.Instance]
T = TypeVar("T")


def provides(instance: rpb.Instance, capability: str) -> bool:
    return any(answers_to(t, capability) for t in instance.tools)


class RegistryStore(abc.ABC):
    """Where the registry keeps instances, and who hears of changes. ``put`` and ``remove``
    may wait on a remote store (etcd); the view (``instances``, ``subscribe``) is local, and
    an implementation tells its watchers of every change with ``_tell``."""

    def __init__(self) -> None:
        self._watchers: set[asyncio.Queue[Event]] = set()

    def _tell(self, change: rpb.WatchResponse.Change.ValueType, instance: rpb.Instance) -> None:
        for queue in self._watchers:
            queue.put_nowait((change, instance))

    def subscribe(self) -> tuple[list[rpb.Instance], asyncio.Queue[Event]]:
        """The instances now, and a queue of every change after that, atomically."""
        queue: asyncio.Queue[Event] = asyncio.Queue()
        self._watchers.add(queue)
        return self.instances(), queue

    def unsubscribe(self, queue: asyncio.Queue[Event]) -> None:
        self._watchers.discard(queue)

    async def start(self) -> None:  # noqa: B027  # an optional hook
        """Before the registry serves."""

    async def stop(self) -> None:  # noqa: B027  # an optional hook
        """After it stopped."""

    @abc.abstractmethod
    async def put(self, instance: rpb.Instance) -> None:
        """Add or replace an instance (by instance_id); tell watchers."""

    @abc.abstractmethod
    async def remove(self, instance: rpb.Instance) -> bool:
        """Drop ``instance`` if it is still what this registry last put under its id (not
        replaced by a newer registration); tell watchers. Whether it was dropped."""

    @abc.abstractmethod
    def instances(self) -> list[rpb.Instance]:
        """Every instance now."""


class MemoryStore(RegistryStore):
    def __init__(self) -> None:
        super().__init__()
        self._instances: dict[str, rpb.Instance] = {}

    async def put(self, instance: rpb.Instance) -> None:
        known = instance.instance_id in self._instances
        self._instances[instance.instance_id] = instance
        self._tell(Change.CHANGE_UPDATED if known else Change.CHANGE_ADDED, instance)

    async def remove(self, instance: rpb.Instance) -> bool:
        if self._instances.get(instance.instance_id) is not instance:
            return False
        del self._instances[instance.instance_id]
        self._tell(Change.CHANGE_REMOVED, instance)
        return True

    def instances(self) -> list[rpb.Instance]:
        return list(self._instances.values())


class RegistryServicer(rpb_grpc.RegistryServiceServicer):
    def __init__(
        self,
        store: RegistryStore,
        lease_ms: int = LEASE_MS,
        lost_after: float = LOST_AFTER,
        auth: Authenticator | None = None,
        registrants: Mapping[str, Iterable[str]] | None = None,
    ) -> None:
        self.store = store
        self.lease_ms = lease_ms
        self.lost_after = lost_after
        self.auth = auth if auth is not None else Authenticator()
        #: principal -> the agent names it may register ("*": any); None: any principal any.
        self.registrants = (
            None if registrants is None else {p: frozenset(n) for p, n in registrants.items()}
        )
        #: Who registered each instance: only they may update or remove it.
        self._owners: dict[str, str] = {}
        #: Instance ids removed as unreachable, oldest first: told so if they come back.
        self._declared_lost: collections.OrderedDict[str, None] = collections.OrderedDict()
        #: Set when the registry stops: open streams end normally instead of being cut.
        self.stopping = asyncio.Event()

    async def Register(  # type: ignore[override]  # writes with context.write
        self,
        request_iterator: AsyncIterator[rpb.RegisterRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        principal = await self.auth.caller(context)
        lease = self.lease_ms / 1000
        messages: asyncio.Queue[rpb.RegisterRequest | None] = asyncio.Queue()
        # One task reads the stream (None: it ended); waiting for a message with a timeout
        # then never cancels a read half-way.
        async with beside(_read(request_iterator, messages)):
            await self._register(messages, lease, context, principal)

    def _may_register(self, principal: str, instance: rpb.Instance) -> str | None:
        """Why ``principal`` may not register ``instance``, or None if it may."""
        owner = self._owners.get(instance.instance_id)
        if owner is not None and owner != principal:
            return f"instance {instance.instance_id} is registered by another principal"
        if self.registrants is None:
            return None
        allowed = self.registrants.get(principal, frozenset())
        if "*" in allowed or instance.agent_name in allowed:
            return None
        return (
            f"{principal or 'an anonymous caller'} may not register agent "
            f"{instance.agent_name!r} (the registry's --registrants do not list it)"
        )

    async def _register(
        self,
        messages: asyncio.Queue[rpb.RegisterRequest | None],
        lease: float,
        context: grpc.aio.ServicerContext[Any, Any],
        principal: str,
    ) -> None:
        first = await _next(messages, self.stopping, lease)
        if first is None or isinstance(first, _Silence):
            return
        if first.WhichOneof("kind") != "instance" or not first.instance.instance_id:
            await context.abort_with_status(
                invalid_stream("the first Register message must be an instance").status()
            )
        refused = self._may_register(principal, first.instance)
        if refused is not None:
            await context.abort_with_status(denied(refused).status())
        instance = rpb.Instance()
        instance.CopyFrom(first.instance)
        if instance.state == rpb.INSTANCE_STATE_UNSPECIFIED:
            instance.state = rpb.INSTANCE_STATE_SERVING
        self._owners[instance.instance_id] = principal
        await self.store.put(instance)
        name = f"instance {instance.instance_id} ({instance.agent_name})"
        log.info(
            "%s registered at %s: %s",
            name,
            instance.endpoint,
            ", ".join(sorted({t.capability for t in instance.tools})),
        )
        why = "deregistered"
        silent_since: float | None = None  # when it last missed its lease, while it does
        lost = False
        declared = instance.instance_id in self._declared_lost
        self._declared_lost.pop(instance.instance_id, None)
        try:
            await context.write(
                rpb.RegisterResponse(lease_ms=self.lease_ms, declared_lost=declared)
            )
            while True:
                message = await _next(messages, self.stopping, lease)
                if isinstance(message, _Silence):
                    now = time.monotonic()
                    if silent_since is None:
                        # Its stream lives: a pause or a slow link, not (yet) a death.
                        silent_since = now - lease
                        instance = _with_state(instance, rpb.INSTANCE_STATE_UNREACHABLE)
                        await self.store.put(instance)
                        log.info("%s missed its lease: unreachable", name)
                    elif now - silent_since >= self.lost_after:
                        why, lost = f"unreachable for {self.lost_after:g} s: lost", True
                        break
                    continue
                if message is None:
                    if self.stopping.is_set():
                        why = "let go: the registry is stopping"
                    break
                beat = message.heartbeat
                state = beat.state or instance.state
                if silent_since is not None:
                    silent_since = None
                    state = beat.state or rpb.INSTANCE_STATE_SERVING
                    log.info("%s answers again", name)
                if state != instance.state or beat.open_sessions != instance.open_sessions:
                    instance = _with_state(instance, state, beat.open_sessions)
                    await self.store.put(instance)
        except asyncio.CancelledError:
            why = "gone (stream broken)"
            raise
        finally:
            if await self.store.remove(instance):  # not replaced by a newer registration
                self._owners.pop(instance.instance_id, None)
                log.info("%s %s", name, why)
        if lost:
            self._declared_lost[instance.instance_id] = None
            if len(self._declared_lost) > REMEMBER_LOST:
                self._declared_lost.popitem(last=False)
            # Why it was removed, should it read it; it is told again if it registers anew.
            lost_here = Fail(
                Reason.INSTANCE_LOST,
                f"{name} stayed unreachable for {self.lost_after:g} s and was removed; "
                "its sessions were reported lost to their callers",
                {"instance_id": instance.instance_id},
            )
            await context.abort_with_status(lost_here.status())

    async def ListInstances(
        self, request: rpb.ListInstancesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> rpb.ListInstancesResponse:
        await self.auth.caller(context)
        found = self.store.instances()
        if request.capability:
            found = [i for i in found if provides(i, request.capability)]
        return rpb.ListInstancesResponse(instances=found)

    async def Watch(  # type: ignore[override]  # writes with context.write
        self, request: rpb.WatchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        await self.auth.caller(context)
        snapshot, queue = self.store.subscribe()
        try:
            for instance in snapshot:
                await context.write(
                    rpb.WatchResponse(change=Change.CHANGE_ADDED, instance=instance)
                )
            await context.write(rpb.WatchResponse(snapshot_done=True))
            while isinstance(event := await _next(queue, self.stopping), tuple):
                change, instance = event
                await context.write(rpb.WatchResponse(change=change, instance=instance))
        finally:
            self.store.unsubscribe(queue)


class _Silence:
    """_next found nothing within its timeout."""


SILENCE = _Silence()


async def _next(
    queue: asyncio.Queue[T], stopping: asyncio.Event, within: float | None = None
) -> T | _Silence | None:
    """The next item; SILENCE if none came ``within`` seconds; None once the registry is
    stopping. Never loses an item: it is not cancelled from outside while it holds one."""
    if stopping.is_set():
        return None
    done: dict[int, Any] = {}
    with anyio.move_on_after(within):
        done = await race(queue.get, stopping.wait)  # a get cut off waiting takes nothing
    if 0 in done:
        item: T = done[0]
        return item
    return None if stopping.is_set() else SILENCE


async def _read(
    requests: AsyncIterator[rpb.RegisterRequest], into: asyncio.Queue[rpb.RegisterRequest | None]
) -> None:
    try:
        async for message in requests:
            into.put_nowait(message)
    finally:
        into.put_nowait(None)


def _with_state(
    instance: rpb.Instance, state: rpb.InstanceState.ValueType, open_sessions: int | None = None
) -> rpb.Instance:
    """A copy (instances in the store are never changed in place)."""
    updated = rpb.Instance()
    updated.CopyFrom(instance)
    updated.state = state
    if open_sessions is not None:
        updated.open_sessions = open_sessions
    return updated


class Registry:
    """The registry server (``sessionmesh registry``), on 127.0.0.1 by default.

    Example::

        async with Registry() as registry:
            agent = Agent([increment], registry=registry.address)
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        store: RegistryStore | None = None,
        lease_ms: int = LEASE_MS,
        lost_after: float = LOST_AFTER,
        tls: TLS | None = None,
        insecure: bool = False,
        auth_tokens: str | Mapping[str, str] | None = None,
        authenticate: Verifier | None = None,
        registrants: str | Mapping[str, Iterable[str]] | None = None,
        metrics_port: int | None = None,
    ) -> None:
        if lost_after * 1000 < lease_ms:
            raise UsageError("lost_after must be at least one lease")
        self.tls = tls
        self.insecure = insecure
        self.metrics_port = metrics_port
        self.metrics: RegistryMetrics | None = None
        self.auth = Authenticator.serving(tls, auth_tokens, authenticate)
        self.registrants = (
            read_registrants(registrants) if isinstance(registrants, str) else registrants
        )
        if self.registrants is not None and not self.auth.on:
            raise UsageError(
                "registrants (--registrants) name principals, but this registry does not know "
                "who calls it: give it --tls-client-ca, --auth-tokens or authenticate="
            )
        self.host = host
        self.port = port
        self.store = store or MemoryStore()
        self.lease_ms = lease_ms
        self.lost_after = lost_after
        self._server: grpc.aio.Server | None = None
        self._servicer: RegistryServicer | None = None

    @property
    def address(self) -> str:
        if self._server is None:
            raise UsageError("the registry is not started")
        return f"{self.host}:{self.port}"

    async def start(self) -> str:
        guard_grpc_logs()
        server = grpc.aio.server(options=server_options())
        self._servicer = RegistryServicer(
            self.store, self.lease_ms, self.lost_after, self.auth, self.registrants
        )
        rpb_grpc.add_RegistryServiceServicer_to_server(self._servicer, server)
        standard = StandardServices(server, SERVICE_NAME)
        self.port = bind(server, self.host, self.port, self.tls, insecure=self.insecure)
        try:
            await self.store.start()
            if self.metrics_port is not None:
                self.metrics = RegistryMetrics(self.store.instances)
                self.metrics.serve(self.host, self.metrics_port, self.tls, insecure=self.insecure)
            await server.start()
            await standard.serving()
        except BaseException:  # nothing half-started stays: the port, the store's links
            await server.stop(0)
            await self.store.stop()
            if self.metrics is not None:
                self.metrics.stop()
                self.metrics = None
            raise
        self._server = server
        log.info("registry serving on %s", self.address)
        return self.address

    async def stop(self, grace: float = 1.0) -> None:
        if self._server is not None:
            if self._servicer is not None:
                self._servicer.stopping.set()  # Watch and Register streams end, not cut
            await self._server.stop(grace)
            await self.store.stop()
            if self.metrics is not None:
                self.metrics.stop()
            self._server = None

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def __aenter__(self) -> Registry:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
