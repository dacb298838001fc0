"""An agent's registration: held open as a stream, with heartbeats, renewed after outages."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import anyio
import grpc

from sessionmesh.core import Credentials
from sessionmesh.core._tasks import Tasks, beside
from sessionmesh.v1 import registry_service_pb2 as rpb
from sessionmesh.v1 import registry_service_pb2_grpc as rpb_grpc
from sessionmesh.wire.limits import channel_options

log = logging.getLogger("sessionmesh.registration")


class Registration:
    """Keeps one instance registered while the agent runs, re-registering on its own when
    the registry restarts. Sessions never depend on it: they go agent to agent."""

    def __init__(
        self,
        registry: str,
        instance: Callable[[], rpb.Instance],
        heartbeat: Callable[[], rpb.Heartbeat],
        declared_lost: Callable[[], Awaitable[None]],
        credentials: Credentials | None = None,
    ) -> None:
        self.registry = registry
        self._instance = instance
        self._heartbeat = heartbeat
        self._declared_lost = declared_lost
        self._channel = (credentials or Credentials()).channel(registry, channel_options())
        self._nudged = asyncio.Event()
        self._tasks = Tasks(f"the registration with {registry}", log)
        self._call: grpc.aio.StreamStreamCall[rpb.RegisterRequest, rpb.RegisterResponse] | None = (
            None
        )
        self.registered = asyncio.Event()
        self.trouble = Unregistered(registry)
        self._stopping = False

    def start(self) -> None:
        self._tasks.start(self._run())

    def nudge(self) -> None:
        """Send a heartbeat now (the state changed)."""
        self._nudged.set()

    async def _run(self) -> None:
        stub = rpb_grpc.RegistryServiceStub(self._channel)
        backoff = 0.05
        was_registered = False
        while True:
            call = self._call = stub.Register()
            try:
                await call.write(rpb.RegisterRequest(instance=self._instance()))
                first = await call.read()
                if first is grpc.aio.EOF:
                    raise ConnectionError("the registry ended the registration")
                assert isinstance(first, rpb.RegisterResponse)
                if first.declared_lost:
                    # Removed while it could not answer (paused, cut off): its callers were
                    # told its sessions are lost, so they must not live on here as orphans.
                    log.warning(
                        "the registry at %s had declared this instance lost; closing the "
                        "sessions its callers were told are gone",
                        self.registry,
                    )
                    await self._declared_lost()
                interval = max(first.lease_ms, 30) / 3000
                log.info(
                    "%s with the registry at %s",
                    "re-registered" if was_registered else "registered",
                    self.registry,
                )
                was_registered = True
                self.registered.set()
                self.trouble.succeeded()
                backoff = 0.05
                # The registry sends nothing more: reading shows at once when it ends the
                # registration (or the stream breaks), while a task sends the heartbeats.
                async with beside(self._beat(call, interval)):
                    await call.read()
                if self._stopping:
                    return  # the goodbye of stop(): the registry ended it as asked
                raise ConnectionError("the registry ended the registration")
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError, ConnectionError) as exc:
                if self.registered.is_set():
                    log.info(
                        "lost the registry at %s (%s); registering again",
                        self.registry,
                        why_not(exc),
                    )
                elif not self._stopping:
                    self.trouble.failed(why_not(exc))
                self.registered.clear()
            finally:
                call.cancel()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    async def _beat(
        self,
        call: grpc.aio.StreamStreamCall[rpb.RegisterRequest, rpb.RegisterResponse],
        interval: float,
    ) -> None:
        while True:
            with anyio.move_on_after(interval):
                await self._nudged.wait()
            self._nudged.clear()
            try:
                await call.write(rpb.RegisterRequest(heartbeat=self._heartbeat()))
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                return  # the stream broke: the read tells why

    async def stop(self) -> None:
        """Deregister at once (a half-close tells the registry this is a clean goodbye)."""
        self._stopping = True
        if self._tasks:  # registering (the task runs until stop)
            call = self._call
            if call is not None and self.registered.is_set():
                # Half-close and wait for the registry to end the stream: a clean goodbye.
                with contextlib.suppress(
                    grpc.aio.AioRpcError, asyncio.InvalidStateError, TimeoutError
                ):
                    await asyncio.wait_for(call.done_writing(), 1.0)
                    await asyncio.wait_for(call.code(), 1.0)
            await self._tasks.aclose()
        await self._channel.close()


class Unregistered:
    """Says why an agent cannot register, at WARNING: at once, then less and less often
    while it keeps failing (2 s, 4 s, ... a minute apart), and once more when it is in."""

    __slots__ = ("_every", "_next_at", "failures", "registry", "why")

    def __init__(self, registry: str) -> None:
        self.registry = registry
        self.why = ""
        self.failures = 0
        self._every = 2.0
        self._next_at = 0.0

    def failed(self, why: str) -> None:
        self.why = why
        self.failures += 1
        now = time.monotonic()
        if now >= self._next_at:
            log.warning(
                "cannot register with the registry at %s: %s; trying again (callers cannot "
                "find this agent until it is registered)",
                self.registry,
                why,
            )
            self._next_at = now + self._every
            self._every = min(self._every * 2, 60.0)

    def succeeded(self) -> None:
        if self.failures:
            log.warning("registered with the registry at %s after all", self.registry)
        self.failures = 0
        self._every = 2.0
        self._next_at = 0.0


def why_not(exc: BaseException) -> str:
    """What a failed registration attempt says, for a person."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc) or type(exc).__name__
