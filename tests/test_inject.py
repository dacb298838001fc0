"""Dependencies injected as proxies, configured by the consumer's own keywords."""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

import pytest

from sessionmesh import mesh
from sessionmesh.errors import CallTimeout, ToolFailed, UsageError
from sessionmesh.testing import eventually, running_agent
from tests.tools import increment, stream_count

pytestmark = pytest.mark.anyio


@mesh.tool(
    capability="auto_session_test",
    dependencies=["session_counter"],
    session_required=True,
    stateful=True,
    auto_session_management=True,
)
async def auto_session_affinity(
    test_rounds: int = 3, session_counter: mesh.McpAgent | None = None
) -> dict[str, Any]:
    """The design note's consumer, as written there."""
    if not session_counter:
        return {"error": "No session_counter service available"}
    results = []
    for round_num in range(1, test_rounds + 1):
        result = await session_counter(increment=round_num)
        results.append({"round": round_num, "response": result})
    return {
        "test_rounds": test_rounds,
        "results": results,
        "auto_session": True,
        "session": session_counter.session_id,
    }


async def test_the_design_notes_consumer_gets_one_auto_session_per_invocation() -> None:
    async with running_agent(increment) as (provider, _):
        peers = {"session_counter": provider.address}
        async with running_agent(auto_session_affinity, peers=peers) as (_, client):
            consumer = client.proxy("auto_session_test")
            first = await consumer(test_rounds=3)
            assert [r["response"] for r in first["results"]] == [1, 3, 6]
            second = await consumer(test_rounds=2)
            assert [r["response"] for r in second["results"]] == [1, 3]  # a fresh session
            assert first["session"] != second["session"]
            assert len(provider.sessions) == 0  # both closed when their invocation returned
            assert provider.sessions.counters["created"] == 2


async def test_without_a_provider_the_dependency_is_none() -> None:
    async with running_agent(auto_session_affinity) as (_, client):
        assert await client.proxy("auto_session_test")() == {
            "error": "No session_counter service available"
        }


async def test_a_failing_consumer_still_closes_its_auto_session() -> None:
    @mesh.tool(dependencies=["session_counter"], session_required=True)
    async def fails_midway(session_counter: mesh.McpAgent | None = None) -> None:
        assert session_counter is not None
        await session_counter(increment=1)
        raise RuntimeError("consumer failed")

    async with running_agent(increment) as (provider, _):
        async with running_agent(fails_midway, peers={"session_counter": provider.address}) as (
            _,
            client,
        ):
            with pytest.raises(ToolFailed, match="consumer failed"):
                await client.proxy("fails_midway")()
            assert len(provider.sessions) == 0


async def test_a_consumer_called_in_a_session_keeps_its_downstream_session() -> None:
    @mesh.tool(dependencies=["session_counter"], session_required=True)
    async def chained(session: mesh.Session, session_counter: mesh.McpAgent | None = None) -> int:
        assert session_counter is not None
        return int(await session_counter(increment=1))

    async with running_agent(increment) as (provider, _):
        async with running_agent(chained, peers={"session_counter": provider.address}) as (
            consumer,
            client,
        ):
            async with client.proxy("chained", session_required=True) as p:
                assert [await p(), await p(), await p()] == [1, 2, 3]
                assert len(provider.sessions) == 1
            assert len(consumer.sessions) == 0
            assert len(provider.sessions) == 0  # closed together with the caller's session


async def test_consumer_keywords_configure_the_injected_proxy() -> None:
    seen: dict[str, Any] = {}

    @mesh.tool
    async def slow_provider() -> None:
        await asyncio.Event().wait()

    @mesh.tool(
        dependencies=["slow_provider"], timeout=0.3, retry_count=2, retry_delay=0.01, buffer_size=7
    )
    async def impatient(slow_provider: mesh.McpAgent | None = None) -> str:
        assert slow_provider is not None
        seen["settings"] = slow_provider.settings
        try:
            await slow_provider.options(timeout=0.1)()
        except CallTimeout:
            return "timed out"
        return "no timeout"

    async with running_agent(slow_provider) as (provider, _):
        async with running_agent(impatient, peers={"slow_provider": provider.address}) as (
            _,
            client,
        ):
            assert await client.proxy("impatient")() == "timed out"
    settings = seen["settings"]
    assert (settings.timeout, settings.retry_count, settings.retry_delay, settings.buffer_size) == (
        0.3,
        2,
        0.01,
        7,
    )
    assert settings.session_required is False


async def test_streaming_with_sessions_as_in_the_note() -> None:
    @mesh.tool(
        capability="streaming_session_service",
        dependencies=["stream_count"],
        session_required=True,
        streaming=True,
    )
    async def stream_with_sessions(stream_count: mesh.McpAgent | None = None) -> Any:
        assert stream_count is not None
        async for chunk in stream_count.call_tool_auto("stream_count", {"start": 1}):
            yield chunk

    async with running_agent(stream_count) as (provider, _):
        async with running_agent(
            stream_with_sessions, peers={"stream_count": provider.address}
        ) as (_, client):
            chunks = [c async for c in client.proxy("streaming_session_service").stream()]
            assert [c["i"] for c in chunks] == [1, 2, 3]
            assert len(provider.sessions) == 0


async def test_short_lived_clients_spread_their_sessions_over_replicas() -> None:
    async with mesh.Registry() as registry:
        replicas = [mesh.Agent([increment], registry=registry.address) for _ in range(3)]
        for agent in replicas:
            await agent.start()
        try:
            owners = set()
            for _ in range(12):  # a fresh client each time, as `sessionmesh call` makes
                async with mesh.connect(registry=registry.address) as client:
                    await eventually(functools.partial(_sees, client, 3), what="3 replicas")
                    async with client.proxy("session_counter", session_required=True) as p:
                        await p(increment=1)
                        owners.add(str(p.session_id).partition(".")[0])
            assert len(owners) > 1  # all twelve on one replica: (1/3)^11 by chance
        finally:
            for agent in replicas:
                await agent.stop()


def _sees(client: mesh.MeshClient, n: int) -> bool:
    return len(client.instances()) == n


async def test_a_dependency_nobody_provides_is_named_at_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    @mesh.tool(dependencies=["nowhere"])
    async def lonely(nowhere: mesh.McpAgent | None = None) -> bool:
        return nowhere is None

    with caplog.at_level(logging.WARNING, logger="sessionmesh.agent"):
        async with mesh.Registry() as registry:
            async with running_agent(lonely, registry=registry.address) as (_, client):
                assert await client.proxy("lonely")() is True
    warned = [r.getMessage() for r in caplog.records if "depends on 'nowhere'" in r.getMessage()]
    assert len(warned) == 1 and "gets None" in warned[0], warned


def test_a_tool_inside_the_agent_class_is_explained() -> None:
    with pytest.raises(UsageError, match="tools are module-level functions"):

        @mesh.agent(name="cart")
        class Cart:
            @mesh.tool
            def add(self, item: str) -> str:
                return item


async def test_a_plain_def_tool_calls_its_proxies_without_await() -> None:
    @mesh.tool(
        capability="stateful_service",
        dependencies=["session_counter", "stream_count"],
        session_required=True,
        stateful=True,
        timeout=60,
        retry_count=3,
    )
    def sync_consumer(
        session_counter: mesh.McpAgent | None = None, stream_count: mesh.McpAgent | None = None
    ) -> dict[str, Any]:
        assert session_counter is not None and stream_count is not None
        first = session_counter(increment=1)  # a worker thread: the call returns the result
        second = session_counter(increment=2)
        chunks = [c["i"] for c in stream_count.call_tool_auto("stream_count", {"n": 2})]
        return {"counts": [first, second], "chunks": chunks}

    async with running_agent(increment, stream_count) as (provider, _):
        peers = {"session_counter": provider.address, "stream_count": provider.address}
        async with running_agent(sync_consumer, peers=peers) as (_, client):
            got = await client.proxy("stateful_service")()
            assert got == {"counts": [1, 3], "chunks": [1, 2]}  # one session: 1, then 3
            assert len(provider.sessions) == 0  # closed when the tool finished


async def test_sync_iteration_is_refused_in_async_code() -> None:
    async with running_agent(stream_count) as (_, client):
        with pytest.raises(UsageError, match="async for"):
            iter(client.proxy("stream_count", session_required=True).stream(n=1))
