"""Dependency injection: a proxy per declared dependency, scoped to one invocation or session."""

from __future__ import annotations

import asyncio
import contextlib
import typing
from typing import Any, Protocol

from sessionmesh.client import AgentClient, Proxy, connect

if typing.TYPE_CHECKING:
    from collections.abc import AsyncIterator, Mapping

    from sessionmesh.server._session import Session
    from sessionmesh.server._tool import BoundTool, Dependency, ToolSpec


class Resolver(Protocol):
    """Finds a live provider of a dependency: its address, or None when there is none."""

    def resolve(self, dependency: Dependency) -> str | None: ...


class StaticResolver:
    """Providers given up front: capability name -> ``host:port``."""

    def __init__(self, peers: Mapping[str, str]) -> None:
        self.peers = dict(peers)

    def resolve(self, dependency: Dependency) -> str | None:
        return self.peers.get(dependency.capability)


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
        self._clients: dict[str, AgentClient] = {}
        self._by_session: dict[str, dict[str, Proxy]] = {}

    def _client(self, address: str) -> AgentClient:
        client = self._clients.get(address)
        if client is None:
            client = self._clients[address] = connect(address)
        return client

    def _proxy(self, bound: BoundTool, param: str, dependency: Dependency) -> Proxy | None:
        address = self.resolver.resolve(dependency) if self.resolver else None
        if address is None:
            return None
        return self._client(address).proxy(dependency.capability, **proxy_options(bound.spec))

    def scope(
        self, bound: BoundTool, session: Session | None, kwargs: dict[str, Any]
    ) -> contextlib.AbstractAsyncContextManager[None]:
        if not bound.dependencies:
            return contextlib.nullcontext()
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
        clients, self._clients = self._clients, {}
        for client in clients.values():
            await client.aclose()
