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
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from sessionmesh.client import Credentials
from sessionmesh.v1 import registry_service_pb2 as rpb
from sessionmesh.wire import etcd
from sessionmesh.wire.limits import channel_options
from sessionmesh.wire.tasks import cancel_and_wait

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
        dial = credentials if target.secure and credentials is not None else Credentials()
        self._channel = dial.channel(target.grpc_target(), channel_options())
        self._instance = instance
        self._declared_lost = declared_lost
        self.ttl = max(MIN_TTL, math.ceil(ttl))
        self._nudged = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lease = 0
        self.registered = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

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
                requests: asyncio.Queue[Any] = asyncio.Queue()
                keepalive = leases.LeaseKeepAlive(_drain(requests))
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
                        requests.put_nowait(api.LeaseKeepAliveRequest(ID=self._lease))
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
            except (grpc.aio.AioRpcError, ConnectionError, TimeoutError) as exc:
                # etcd unreachable (or electing a leader): keep the lease, try again.
                why = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
                if self.registered.is_set():
                    log.info(
                        "lost etcd at %s (%s); keeping the lease and trying again",
                        self.registry,
                        why,
                    )
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
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        if self._lease:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self._api.LeaseStub(self._channel).LeaseRevoke(
                    self._api.LeaseRevokeRequest(ID=self._lease), timeout=1
                )
            self._lease = 0
        await self._channel.close()


async def _drain(queue: asyncio.Queue[Any]) -> AsyncIterator[Any]:
    while True:
        yield await queue.get()
