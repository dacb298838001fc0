"""Test helpers for code that uses sessionmesh.

``running_agent`` serves tools on 127.0.0.1 over real gRPC, in this process::

    @pytest.mark.anyio
    async def test_counter() -> None:
        async with testing.running_agent(increment) as (agent, client):
            async with client.proxy("increment", session_required=True) as counter:
                assert await counter(increment=2) == 2
            assert len(agent.sessions) == 0

``MemoryEndpoint`` / ``MemoryTransport`` put the same agent logic behind the client's
Endpoint seam with no sockets at all, for fast tests of code that calls through proxies,
with faults switched on by the test (``endpoint.unreachable = True``,
``transport.remove(endpoint)``)::

    endpoint = testing.MemoryEndpoint([increment])
    async with AgentClient(EndpointTransport(endpoint)) as client:
        ...
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from sessionmesh._memory import MemoryEndpoint, MemoryTransport
from sessionmesh.client import AgentClient, connect
from sessionmesh.server import Agent

__all__ = ["MemoryEndpoint", "MemoryTransport", "eventually", "running_agent"]


@contextlib.asynccontextmanager
async def running_agent(
    *tools: Callable[..., Any], **settings: Any
) -> AsyncIterator[tuple[Agent, AgentClient]]:
    """Start an agent serving ``tools`` on a free port and connect a client to it."""
    agent = Agent(tools, **settings)
    await agent.start()
    try:
        async with connect(agent.address) as client:
            yield agent, client
    finally:
        await agent.stop(grace=1.0)


async def eventually(
    check: Callable[[], bool | Awaitable[bool]], *, within: float = 5.0, what: str = "condition"
) -> None:
    """Poll ``check`` (plain or async) until it holds; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        held = check()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not hold within {within} s")
        await asyncio.sleep(0.005)
