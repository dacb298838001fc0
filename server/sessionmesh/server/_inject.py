"""Dependency injection: a proxy per declared dependency, scoped to one invocation or session."""

from __future__ import annotations

import asyncio
import contextlib
import typing
from typing import Any, Protocol

from sessionmesh.client import Proxy, ProxyOptions
from sessionmesh.client._mesh import Dependency, EndpointPool, MeshTransport
from sessionmesh.client._transport import ChannelTransport, Transport

if typing.TYPE_CHECKING:
    from collections.abc import AsyncIterator, Mapping

    from sessionmesh.server._session import Session
    from sessionmesh.server._tool import BoundTool, ToolSpec


_NO_SCOPE: contextlib.AbstractAsyncContextManager[None] = contextlib.nullcontext()  # stateless


class Resolver(Protocol):
    """Finds the live providers of a dependency: a transport over them, or None if none."""

    def transport_for(self, dependency: Dependency) -> Transport | None: ...

    async def aclose(self) -> None: ...


class StaticResolver:
    """Providers given up front: capability name -> ``host:port``."""

    def __init__(self, peers: Mapping[str, str]) -> None:
        self.peers = dict(peers)
        self._transports: dict[str, ChannelTransport] = {}

    def transport_for(self, dependency: Dependency) -> Transport | None:
        address = self.peers.get(dependency.capability)
        if address is None:
            return None
        transport = self._transports.get(address)
        if transport is None:
            transport = self._transports[address] = ChannelTransport(address)
        return transport

    async def aclose(self) -> None:
        transports, self._transports = self._transports, {}
        for transport in transports.values():
            await transport.aclose()


class RegistryResolver:
    """Providers as the registry lists them now: the next invocation sees a provider that
    came up, and gets None for one that went away."""

    def __init__(self, pool: EndpointPool) -> None:
        self.pool = pool
        self._transports: dict[Dependency, MeshTransport] = {}

    def transport_for(self, dependency: Dependency) -> Transport | None:
        if not self.pool.watch.providers(dependency):
            return None
        transport = self._transports.get(dependency)
        if transport is None:
            transport = self._transports[dependency] = MeshTransport(self.pool, dependency)
        return transport

    async def aclose(self) -> None:
        self._transports.clear()  # the pool's owner closes the channels


def proxy_options(spec: ToolSpec) -> dict[str, Any]:
    """The consumer tool's keywords that configure the proxies injected into it."""
    return {
        "session_required": spec.session_required,
        "stateful": spec.stateful,
        "auto_session_management": spec.auto_session_management,
        "timeout": spec.timeout,
        "retry_count": spec.retry_count,
        "retry_delay": spec.retry_delay,
        "streaming": spec.streaming,
        "stream_timeout": spec.stream_timeout,
        "buffer_size": spec.buffer_size,
    }


class Injector:
    def __init__(self, resolver: Resolver | None) -> None:
        self.resolver = resolver
        self._by_session: dict[str, dict[str, Proxy]] = {}

    def _proxy(self, bound: BoundTool, param: str, dependency: Dependency) -> Proxy | None:
        transport = self.resolver.transport_for(dependency) if self.resolver else None
        if transport is None:
            return None
        return Proxy(transport, dependency.capability, ProxyOptions(**proxy_options(bound.spec)))

    def scope(
        self, bound: BoundTool, session: Session | None, kwargs: dict[str, Any]
    ) -> contextlib.AbstractAsyncContextManager[None]:
        if not bound.dependencies:
            return _NO_SCOPE
        return self._scope(bound, session, kwargs)

    @contextlib.asynccontextmanager
    async def _scope(
        self, bound: BoundTool, session: Session | None, kwargs: dict[str, Any]
    ) -> AsyncIterator[None]:
        # Auto sessions opened for one invocation close when it ends; when the consumer runs
        # inside a session itself, they live (and close) with that session instead.
        per_call: list[Proxy] = []
        for param in bound.dependencies:
            assert param.dependency is not None
            if session is not None and bound.spec.session_required:
                held = self._by_session.get(session.id)
                if held is None:
                    held = self._by_session[session.id] = {}
                    session.on_close(self._closer(session.id))
                proxy = held.get(param.name)
                if proxy is None:
                    proxy = self._proxy(bound, param.name, param.dependency)
                    if proxy is not None:
                        held[param.name] = proxy
            else:
                proxy = self._proxy(bound, param.name, param.dependency)
                if proxy is not None:
                    per_call.append(proxy)
            kwargs[param.name] = proxy
        try:
            yield
        finally:
            for proxy in per_call:
                await asyncio.shield(proxy.cleanup_auto_session())

    def _closer(self, session_id: str) -> typing.Callable[[], typing.Awaitable[None]]:
        async def close() -> None:
            for proxy in self._by_session.pop(session_id, {}).values():
                await proxy.cleanup_auto_session()

        return close

    async def aclose(self) -> None:
        if self.resolver is not None:
            await self.resolver.aclose()
