"""Dependency injection: a proxy per declared dependency, scoped to one invocation or session."""

from __future__ import annotations

import asyncio
import contextlib
import typing
from typing import Any, Protocol

from sessionmesh.client import AgentClient, BaseProxy, MeshClient, connect
from sessionmesh.core import Dependency, ProxyOptions

if typing.TYPE_CHECKING:
    from collections.abc import AsyncIterator, Mapping

    from sessionmesh.server._session import Session
    from sessionmesh.server._tool import BoundTool


_NO_SCOPE: contextlib.AbstractAsyncContextManager[None] = contextlib.nullcontext()  # stateless


class Resolver(Protocol):
    """Finds the live providers of a dependency: a proxy over them, or None if none."""

    def proxy_for(self, dependency: Dependency, options: ProxyOptions) -> BaseProxy | None: ...

    async def aclose(self) -> None: ...


class StaticResolver:
    """Providers given up front: capability name -> ``host:port``."""

    def __init__(self, peers: Mapping[str, str]) -> None:
        self.peers = dict(peers)
        self._clients: dict[str, AgentClient] = {}

    def proxy_for(self, dependency: Dependency, options: ProxyOptions) -> BaseProxy | None:
        address = self.peers.get(dependency.capability)
        if address is None:
            return None
        client = self._clients.get(address)
        if client is None:
            client = self._clients[address] = connect(address)
        return client.proxy(dependency.capability, options)

    async def aclose(self) -> None:
        clients, self._clients = self._clients, {}
        for client in clients.values():
            await client.aclose()


class RegistryResolver:
    """Providers as the registry lists them now: the next invocation sees a provider that
    came up, and gets None for one that went away."""

    def __init__(self, client: MeshClient) -> None:
        self.client = client

    def proxy_for(self, dependency: Dependency, options: ProxyOptions) -> BaseProxy | None:
        if not self.client.providers(dependency):
            return None
        return self.client.proxy(dependency, options)

    async def aclose(self) -> None:
        return None  # the client belongs to the agent


class Injector:
    def __init__(self, resolver: Resolver | None) -> None:
        self.resolver = resolver
        self._by_session: dict[str, dict[str, BaseProxy]] = {}

    def _proxy(self, bound: BoundTool, dependency: Dependency) -> BaseProxy | None:
        if self.resolver is None:
            return None
        return self.resolver.proxy_for(dependency, bound.spec.proxy_options)

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
        per_call: list[BaseProxy] = []
        for param in bound.dependencies:
            assert param.dependency is not None
            if session is not None and bound.spec.options.session_required:
                held = self._by_session.get(session.id)
                if held is None:
                    held = self._by_session[session.id] = {}
                    session.on_close(self._closer(session.id))
                proxy = held.get(param.name)
                if proxy is None:
                    proxy = self._proxy(bound, param.dependency)
                    if proxy is not None:
                        held[param.name] = proxy
            else:
                proxy = self._proxy(bound, param.dependency)
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
