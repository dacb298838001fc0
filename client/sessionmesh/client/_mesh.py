"""Resolving through a registry: a live view of the instances, and a transport over them.

RegistryWatch keeps a copy of the registry's instances by Watch (pushed, not polled) and
keeps it through registry restarts, so calls, sessions above all, go on while the registry
is down. MeshTransport spreads new sessions and session-less calls over the live, serving
instances of one capability and sends every call of a session to the instance that owns it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections.abc import Callable

import anyio

from sessionmesh.client._etcd import EtcdSource
from sessionmesh.client._etcd import parse as parse_etcd
from sessionmesh.client._grpc import GrpcEndpoint, RegistryChannel
from sessionmesh.client._transport import Endpoint, Transport
from sessionmesh.core._credentials import PLAINTEXT, Credentials
from sessionmesh.core._dependency import Dependency
from sessionmesh.core._tasks import Tasks, race
from sessionmesh.errors import (
    AgentUnavailable,
    PermissionDenied,
    RemoteError,
    SessionOwnerLost,
    Unauthenticated,
)
from sessionmesh.v1 import registry_service_pb2 as rpb
from sessionmesh.wire.limits import DEFAULT_MAX_MESSAGE_BYTES
from sessionmesh.wire.names import is_durable, short, successors

log = logging.getLogger("sessionmesh.mesh")

Listener = Callable[["rpb.WatchResponse.Change.ValueType", rpb.Instance], None]

#: How long an instance missing from a new registry's first snapshot is still believed in.
REREGISTER_GRACE = 3.0
#: How long the channel of an instance the registry dropped stays open for calls in flight.
RETIRE_AFTER = 30.0
#: After a connection failure an instance is tried last for this long.
_SUSPECT_SECONDS = 2.0


class RegistryWatch:
    """A live copy of the registry's instances."""

    def __init__(self, address: str, credentials: Credentials = PLAINTEXT) -> None:
        self.address = address
        self.credentials = credentials
        self.instances: dict[str, rpb.Instance] = {}
        self.listeners: list[Listener] = []
        self.connected = False
        self._ready = asyncio.Event()
        self._refused = asyncio.Event()  # the registry answered: not this caller
        #: Why the last watch ended, if it did.
        self.last_error: RemoteError | None = None
        etcd = parse_etcd(address)
        self._channel: RegistryChannel | EtcdSource = (
            EtcdSource(etcd, credentials) if etcd else RegistryChannel(address, credentials)
        )
        self._tasks = Tasks(f"the registry watch of {address}", log)
        self._grace: list[asyncio.TimerHandle] = []  # see _replace

    def start(self) -> None:
        if not self._tasks:  # the watch runs until aclose()
            self._tasks.start(self._run())

    async def ready(self, within: float = 10.0) -> None:
        """Wait for the first full view of the registry."""
        self.start()
        with anyio.move_on_after(within):
            await race(self._ready.wait, self._refused.wait)
        if self._ready.is_set():
            return
        error = self.last_error
        if isinstance(error, Unauthenticated | PermissionDenied):
            raise error.copy()
        why = f" (last error: {error.message})" if error is not None else ""
        raise AgentUnavailable(
            f"no answer from the registry at {self.address} within {within} s{why}: is "
            "`sessionmesh registry` (or `sessionmesh run`) running there, and do its TLS "
            "settings match ours?"
        )

    def providers(self, dependency: Dependency, *, serving: bool = True) -> list[rpb.Instance]:
        return [
            i
            for i in self.instances.values()
            if dependency.matches(i) and (not serving or i.state == rpb.INSTANCE_STATE_SERVING)
        ]

    def _tell(self, change: rpb.WatchResponse.Change.ValueType, instance: rpb.Instance) -> None:
        for listener in self.listeners:
            listener(change, instance)

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            fresh: dict[str, rpb.Instance] | None = {}
            try:
                async for message in self._channel.watch():
                    if fresh is not None:  # the snapshot that starts every watch
                        if not message.snapshot_done:
                            fresh[message.instance.instance_id] = message.instance
                            continue
                        self._replace(fresh)
                        fresh = None
                        self.connected = True
                        backoff = 0.05
                        self._ready.set()
                        continue
                    instance = message.instance
                    if message.change == rpb.WatchResponse.CHANGE_REMOVED:
                        self.instances.pop(instance.instance_id, None)
                    else:
                        self.instances[instance.instance_id] = instance
                    self._tell(message.change, instance)
            except (AgentUnavailable, Unauthenticated, PermissionDenied) as exc:
                self.last_error = exc
                if not isinstance(exc, AgentUnavailable):
                    self._refused.set()
                if self.connected:
                    log.info("%s; keeping what it said", exc.message)
            self.connected = False
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    def _replace(self, fresh: dict[str, rpb.Instance]) -> None:
        """A new snapshot (after a (re)connect). Instances missing from it are kept for a
        grace period: a registry that just restarted has not heard from them yet, and
        dropping them would break their open sessions."""
        old = self.instances
        self.instances = dict(fresh)
        loop = asyncio.get_running_loop()
        self._grace = [h for h in self._grace if not h.cancelled() and h.when() > loop.time()]
        for iid, instance in old.items():
            if iid not in fresh:
                self.instances[iid] = instance
                self._grace.append(loop.call_later(REREGISTER_GRACE, self._expire, iid, instance))
        for iid, instance in fresh.items():
            if iid not in old:
                self._tell(rpb.WatchResponse.CHANGE_ADDED, instance)

    def _expire(self, instance_id: str, instance: rpb.Instance) -> None:
        if self.instances.get(instance_id) is instance:  # not heard of again since
            del self.instances[instance_id]
            self._tell(rpb.WatchResponse.CHANGE_REMOVED, instance)

    async def aclose(self) -> None:
        for handle in self._grace:
            handle.cancel()
        await self._tasks.aclose()
        await self._channel.aclose()


#: A session not being looked for (see Transport.seeking).
_NOT_SOUGHT: frozenset[str] = frozenset()


class EndpointPool:
    """One channel per instance, shared by every proxy of a client. When the registry drops
    an instance no new call gets its endpoint (its sessions raise SessionOwnerLost); the
    channel itself closes a little later, after calls in flight on it have failed on their
    own, since closing a channel under a call cancels the caller's task."""

    def __init__(
        self, watch: RegistryWatch, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    ) -> None:
        self.watch = watch
        self.max_message_bytes = max_message_bytes
        self._endpoints: dict[str, GrpcEndpoint] = {}
        self.failed_at: dict[str, float] = {}
        # Round robin, shared by every proxy of the client, from a random start: short-lived
        # clients (a CLI call each) would otherwise all open their session on the first one.
        self.turns = itertools.count(random.randrange(1 << 16))
        #: Endpoints the registry dropped, closed a little later by tasks of the pool's.
        self._retiring: set[GrpcEndpoint] = set()
        self._tasks = Tasks("the client's endpoint pool", log)
        self.closed = False
        watch.listeners.append(self._on_change)

    def get(self, instance: rpb.Instance) -> Endpoint:
        endpoint = self._endpoints.get(instance.instance_id)
        if endpoint is None:
            endpoint = GrpcEndpoint(
                instance.endpoint,
                instance_id=instance.instance_id,
                max_message_bytes=self.max_message_bytes,
                credentials=self.watch.credentials,
            )
            self._endpoints[instance.instance_id] = endpoint
        return endpoint

    def knows(self, endpoint: Endpoint) -> bool:
        return self._endpoints.get(endpoint.instance_id) is endpoint

    def _on_change(
        self, change: rpb.WatchResponse.Change.ValueType, instance: rpb.Instance
    ) -> None:
        if change == rpb.WatchResponse.CHANGE_REMOVED:
            endpoint = self._endpoints.pop(instance.instance_id, None)
            self.failed_at.pop(instance.instance_id, None)
            if endpoint is not None:
                self._retiring.add(endpoint)
                self._tasks.start(self._retire(endpoint))
        elif instance.state == rpb.INSTANCE_STATE_UNREACHABLE:
            endpoint = self._endpoints.get(instance.instance_id)
            if endpoint is not None:
                endpoint.abandon_durable()

    async def _retire(self, endpoint: GrpcEndpoint) -> None:
        await asyncio.sleep(RETIRE_AFTER)  # a policy delay: calls in flight fail on their own
        self._retiring.discard(endpoint)
        await endpoint.aclose()

    async def aclose(self) -> None:
        self.closed = True
        endpoints, self._endpoints = self._endpoints, {}
        await self._tasks.aclose()
        retiring, self._retiring = self._retiring, set()
        for endpoint in [*endpoints.values(), *retiring]:
            await endpoint.aclose()


class MeshTransport(Transport):
    """The instances providing one dependency, as the registry lists them."""

    def __init__(self, pool: EndpointPool, dependency: Dependency) -> None:
        super().__init__()
        self.pool = pool
        self.dependency = dependency

    def pick(self) -> Endpoint:
        candidates = self.pool.watch.providers(self.dependency)
        if not candidates:
            raise AgentUnavailable(
                f"no live provider of {self.dependency.capability!r} in the registry at "
                f"{self.pool.watch.address}"
            )
        healthy = [i for i in candidates if not self._suspect(i.instance_id)]
        choices = healthy or candidates
        return self.pool.get(choices[next(self.pool.turns) % len(choices)])

    def owner(self, session_id: str) -> Endpoint:
        instance_id = self.home(session_id)
        instance = self.pool.watch.instances.get(instance_id)
        if is_durable(session_id):
            if (
                instance is None
                or instance.state == rpb.INSTANCE_STATE_UNREACHABLE
                or self._suspect(instance_id)
            ):
                # It outlives its owner: another live instance takes it over from the
                # store, the same one for every call that follows (they keep their order).
                endpoint = self.pick()
                self.homes[session_id] = endpoint.instance_id
                return endpoint
            return self.pool.get(instance)
        tried = self.seeking.get(session_id, _NOT_SOUGHT)
        if instance is not None and (not tried or instance_id not in tried):
            return self.pool.get(instance)
        if tried is not None:
            # The owner left, or drained without running the call: a live replica may hold
            # the session now (a draining owner hands its sessions on). Look in the order
            # the owner hands them (`successors`): the first one, nearly always.
            found = self._seek(session_id, {*(tried or ()), instance_id})
            if found is not None:
                return found
            self.seeking[session_id] = None  # no replica has it
        if instance is not None:
            return self.pool.get(instance)
        raise SessionOwnerLost(
            f"instance {instance_id}, which owned session {short(session_id)}..., is gone "
            "from the registry, and no live replica holds the session: its state went with it",
            code=AgentUnavailable.default_code,
            metadata={"session_id": session_id, "instance_id": instance_id},
        )

    def _seek(self, session_id: str, tried: set[str]) -> Endpoint | None:
        candidates = {
            i.instance_id: i
            for i in self.pool.watch.providers(self.dependency, serving=False)
            if i.instance_id not in tried and i.state != rpb.INSTANCE_STATE_UNREACHABLE
        }
        if not candidates:
            return None
        self.seeking[session_id] = tried
        return self.pool.get(candidates[successors(session_id, candidates)[0]])

    def seek(self, session_id: str, instance_id: str) -> bool:
        tried = self.seeking.get(session_id, _NOT_SOUGHT)
        if tried is None:
            return False  # looked everywhere already
        self.seeking[session_id] = {*tried, instance_id}
        self.homes.pop(session_id, None)
        return True

    def _suspect(self, instance_id: str) -> bool:
        failed_at = self.pool.failed_at.get(instance_id)
        return failed_at is not None and time.monotonic() - failed_at <= _SUSPECT_SECONDS

    def failed(self, endpoint: Endpoint) -> None:
        self.pool.failed_at[endpoint.instance_id] = time.monotonic()

    def moved(self, session_id: str, instance_id: str) -> None:
        """A redirect names the owner: it is followed whatever this client remembers of
        failures there (the owner answers again, or it could not have taken the session
        over); only an owner the registry no longer lists is not."""
        super().moved(session_id, instance_id)
        self.pool.failed_at.pop(instance_id, None)

    def knows(self, endpoint: Endpoint) -> bool:
        return self.pool.knows(endpoint)

    @property
    def closed(self) -> bool:  # type: ignore[override]
        return self.pool.closed

    async def aclose(self) -> None:
        return None  # the pool's channels belong to the client that made the pool
