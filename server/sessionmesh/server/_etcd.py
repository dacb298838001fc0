"""An agent registered in etcd directly: its key, held by a lease it keeps alive.

The lease's TTL is the bound after which an agent that stops answering is gone (its key
and its sessions with it): a pause shorter than that loses nothing. While etcd cannot be
reached the agent keeps serving and keeps its sessions; it keeps trying with the same
lease, which etcd keeps alive across a leader change. A lease that expired meanwhile means
its callers were told its sessions are lost: those sessions are closed here too, and the
agent registers again with a new lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable

import grpc

from sessionmesh.client import MeshClient
from sessionmesh.core import Credentials
from sessionmesh.core._tasks import Tasks
from sessionmesh.errors import UsageError
from sessionmesh.server._registration import Unregistered, why_not
from sessionmesh.server._registry import RegistryStore
from sessionmesh.v1 import registry_service_pb2 as rpb
from sessionmesh.wire import etcd

log = logging.getLogger("sessionmesh.registration")

#: etcd grants no lease shorter than about 1.5 s (its election timeout x 3/2, by default).
MIN_TTL = 2


class EtcdRegistration:
    """Keeps one instance's key in etcd while the agent runs (``Registration``'s twin)."""

    def __init__(
        self,
        target: etcd.EtcdTarget,
        instance: Callable[[], rpb.Instance],
        declared_lost: Callable[[], Awaitable[None]],
        credentials: Credentials | None = None,
        ttl: float = 5.0,
    ) -> None:
        self.registry = target.url
        self._target = target
        self._api = etcd.api()
        self._channel = (credentials or Credentials()).etcd_channel(target)
        self._instance = instance
        self._declared_lost = declared_lost
        self.ttl = max(MIN_TTL, math.ceil(ttl))
        self._nudged = asyncio.Event()
        self._tasks = Tasks("the etcd registration", log)
        self._lease = 0
        self.registered = asyncio.Event()
        self.trouble = Unregistered(self.registry)

    def start(self) -> None:
        self._tasks.start(self._run())

    def nudge(self) -> None:
        """Write the instance now (its state changed)."""
        self._nudged.set()

    async def _run(self) -> None:
        api = self._api
        kv = api.KVStub(self._channel)
        leases = api.LeaseStub(self._channel)
        key = self._target.key(self._instance().instance_id)
        backoff = 0.05
        while True:
            try:
                if not self._lease:
                    granted = await leases.LeaseGrant(
                        api.LeaseGrantRequest(TTL=self.ttl), timeout=5
                    )
                    self._lease = int(granted.ID)
                written = b""
                keepalive = leases.LeaseKeepAlive()
                try:
                    while True:
                        value = self._instance().SerializeToString()
                        if value != written:
                            await kv.Put(
                                api.PutRequest(key=key, value=value, lease=self._lease), timeout=5
                            )
                            if not written:
                                log.info(
                                    "registered in etcd at %s (lease %d s)", self.registry, self.ttl
                                )
                            written = value
                            self.registered.set()
                            self.trouble.succeeded()
                        await keepalive.write(api.LeaseKeepAliveRequest(ID=self._lease))
                        answer = await asyncio.wait_for(keepalive.read(), 5)
                        if answer is grpc.aio.EOF:
                            raise ConnectionError("etcd ended the keepalive stream")
                        if answer.TTL <= 0:
                            await self._lost()
                            break
                        backoff = 0.05
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._nudged.wait(), self.ttl / 3)
                        self._nudged.clear()
                finally:
                    keepalive.cancel()
            except (
                grpc.aio.AioRpcError,
                asyncio.InvalidStateError,
                ConnectionError,
                TimeoutError,
            ) as exc:
                # etcd unreachable (or electing a leader): keep the lease, try again.
                why = why_not(exc)
                if self.registered.is_set():
                    log.info(
                        "lost etcd at %s (%s); keeping the lease and trying again",
                        self.registry,
                        why,
                    )
                else:
                    self.trouble.failed(why)
                self.registered.clear()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)

    async def _lost(self) -> None:
        """The lease expired while etcd could not hear us: our key, and with it our sessions
        for every caller, are gone. Close them here too, then register anew."""
        log.warning(
            "the etcd lease of this instance expired (it was unreachable for over %d s); "
            "closing the sessions its callers were told are lost",
            self.ttl,
        )
        self._lease = 0
        self.registered.clear()
        await self._declared_lost()

    async def stop(self) -> None:
        """Deregister at once: revoking the lease deletes the key."""
        await self._tasks.aclose()
        if self._lease:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self._api.LeaseStub(self._channel).LeaseRevoke(
                    self._api.LeaseRevokeRequest(ID=self._lease), timeout=1
                )
            self._lease = 0
        await self._channel.close()


class EtcdStore(RegistryStore):
    """A registry process's instances kept in etcd, so that several registries (behind one
    address) serve one mesh: each writes the instances registered with it, under a lease
    it keeps alive while their Register streams live, and every one serves the whole view
    from an etcd watch. A registry that dies takes its instances with it only after their
    lease (``lost_after``); an agent that re-registers elsewhere meanwhile keeps its key."""

    def __init__(self, url: str, credentials: Credentials | None = None, ttl: float = 5.0) -> None:
        super().__init__()
        try:
            target = etcd.parse(url)
            self._api = etcd.api()
        except etcd.EtcdAddressError as exc:
            raise UsageError(str(exc)) from None
        if target is None:
            raise UsageError(f"--store {url}: give an etcd:// address")
        self._target = target
        self._credentials = credentials or Credentials()
        self.ttl = max(MIN_TTL, math.ceil(ttl))
        self._view: MeshClient | None = None
        self._channel: grpc.aio.Channel | None = None
        #: instance id -> (its lease, the Instance this registry last put).
        self._mine: dict[str, tuple[int, rpb.Instance]] = {}
        self._tasks = Tasks("the etcd registry store", log)

    async def start(self) -> None:
        self._channel = self._credentials.etcd_channel(self._target)
        self._view = MeshClient(
            self._target.url, tls=self._credentials.tls, token=self._credentials.token
        )
        self._view.watch.listeners.append(self._tell)
        await self._view.ready(within=10)
        self._tasks.start(self._keep_alive())

    async def put(self, instance: rpb.Instance) -> None:
        assert self._channel is not None
        held = self._mine.get(instance.instance_id)
        if held is None:
            granted = await self._api.LeaseStub(self._channel).LeaseGrant(
                self._api.LeaseGrantRequest(TTL=self.ttl), timeout=5
            )
            lease = int(granted.ID)
        else:
            lease = held[0]
        self._mine[instance.instance_id] = (lease, instance)
        await self._api.KVStub(self._channel).Put(
            self._api.PutRequest(
                key=self._target.key(instance.instance_id),
                value=instance.SerializeToString(),
                lease=lease,
            ),
            timeout=5,
        )

    async def remove(self, instance: rpb.Instance) -> bool:
        held = self._mine.get(instance.instance_id)
        if held is None or held[1] is not instance:
            return False
        del self._mine[instance.instance_id]
        assert self._channel is not None
        with contextlib.suppress(grpc.aio.AioRpcError):  # else its lease ends it
            await self._api.LeaseStub(self._channel).LeaseRevoke(
                self._api.LeaseRevokeRequest(ID=held[0]), timeout=2
            )
        return True

    async def _keep_alive(self) -> None:
        assert self._channel is not None
        stub, api = self._api.LeaseStub(self._channel), self._api
        while True:
            await asyncio.sleep(self.ttl / 3)  # the keepalive period, not a wait for state
            leases = [lease for lease, _ in self._mine.values()]
            if not leases:
                continue
            call = stub.LeaseKeepAlive()  # one stream renews them all
            try:
                for lease in leases:
                    await call.write(api.LeaseKeepAliveRequest(ID=lease))
                for _ in leases:
                    await asyncio.wait_for(call.read(), 2)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError, TimeoutError):
                pass  # etcd unreachable: the next period tries again
            finally:
                call.cancel()

    def instances(self) -> list[rpb.Instance]:
        return self._view.instances() if self._view is not None else []

    async def stop(self) -> None:
        # Leases are not revoked: agents re-registering with another registry keep their keys.
        await self._tasks.aclose()
        if self._view is not None:
            await self._view.aclose()
        if self._channel is not None:
            await self._channel.close()
