"""A caller's deadline and cancellation travel down the mesh: through three agents."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from sessionmesh import mesh
from sessionmesh.errors import CallTimeout
from sessionmesh.testing import eventually, running_agent

pytestmark = pytest.mark.anyio


class Downstream:
    """What the last agent of the chain saw."""

    def __init__(self) -> None:
        self.remaining: list[float | None] = []
        self.cancelled = 0
        self.started = asyncio.Event()


@pytest.fixture
async def chain() -> AsyncIterator[tuple[mesh.AgentClient, Downstream, mesh.Agent]]:
    """front -> middle -> slow, three agents over real gRPC; `slow` waits forever."""
    seen = Downstream()

    @mesh.tool(session_required=True)
    async def slow(session: mesh.Session) -> str:
        seen.remaining.append(mesh.time_remaining())
        seen.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            seen.cancelled += 1
            raise
        return "never"

    @mesh.tool(dependencies=["slow"], session_required=True)
    async def middle(slow: mesh.McpAgent | None = None) -> Any:
        assert slow is not None
        return await slow()

    @mesh.tool(dependencies=["middle"])
    async def front(middle: mesh.McpAgent | None = None) -> Any:
        assert middle is not None
        return await middle()

    async with mesh.Agent([slow], name="c") as c:
        async with mesh.Agent([middle], name="b", peers={"slow": c.address}) as b:
            async with mesh.Agent([front], name="a", peers={"middle": b.address}) as a:
                async with mesh.connect(a.address) as client:
                    yield client, seen, c


async def test_a_callers_deadline_reaches_the_last_agent_and_ends_its_work(
    chain: tuple[mesh.AgentClient, Downstream, mesh.Agent],
) -> None:
    client, seen, c = chain
    with pytest.raises(CallTimeout):
        await client.proxy("front", timeout=1.0)()
    # The last agent was given no more than what remained of the caller's second ...
    assert len(seen.remaining) == 1
    remaining = seen.remaining[0]
    assert remaining is not None and 0 < remaining < 1.0
    # ... and its work was cancelled, its session (opened by the middle agent) closed.
    await eventually(lambda: seen.cancelled == 1, what="the last agent's call is cancelled")
    await eventually(lambda: len(c.sessions) == 0, what="the downstream session is closed")


async def test_a_caller_cancelling_cancels_the_calls_its_call_made(
    chain: tuple[mesh.AgentClient, Downstream, mesh.Agent],
) -> None:
    client, seen, c = chain
    call = asyncio.create_task(client.proxy("front")())  # no deadline at all
    await asyncio.wait_for(seen.started.wait(), 10)
    assert seen.remaining == [None]
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await eventually(lambda: seen.cancelled == 1, what="the last agent's call is cancelled")
    await eventually(lambda: len(c.sessions) == 0, what="the downstream session is closed")


async def test_a_caller_cancelled_while_its_call_is_written_harms_no_other_call() -> None:
    """grpc.aio cancels a whole stream when a write is cancelled halfway; the calls sharing
    the Exchange stream must not notice that one caller went away at that moment."""
    started, release = asyncio.Event(), asyncio.Event()

    @mesh.tool(session_required=True)
    async def held(session: mesh.Session) -> str:
        started.set()
        await release.wait()
        return "answered"

    @mesh.tool(session_required=True)
    async def count(session: mesh.Session) -> int:
        session.state["n"] = session.state.get("n", 0) + 1
        return int(session.state["n"])

    async with running_agent(held, count) as (_, client):
        async with (
            client.proxy("held", session_required=True) as waiting,
            client.proxy("count", session_required=True) as counter,
        ):
            assert await counter() == 1  # both sessions open, on the one shared stream
            other = asyncio.create_task(waiting())
            await asyncio.wait_for(started.wait(), 10)
            for _ in range(20):
                # One step runs the call up to its first wait, the write of its message.
                gone = asyncio.create_task(counter())
                await asyncio.sleep(0)
                gone.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await gone
            release.set()
            assert await asyncio.wait_for(other, 10) == "answered"
            # The session saw each cancelled call at most once, and goes on.
            assert 2 <= await counter() <= 22
