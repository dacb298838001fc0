"""The proxy's session logic against the in-memory transport: no sockets, faults on demand."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from sessionmesh.client import AgentClient, EndpointTransport
from sessionmesh.errors import (
    InvalidArguments,
    SessionLost,
    SessionNotFound,
    SessionOwnerLost,
    SessionOwnerUnavailable,
)
from sessionmesh.testing import MemoryEndpoint, MemoryTransport
from tests.tools import add, increment, peek, stream_count

pytestmark = pytest.mark.anyio

TOOLS: list[Callable[..., Any]] = [increment, peek, stream_count, add]


async def test_the_first_call_opens_the_session_itself() -> None:
    endpoint = MemoryEndpoint(TOOLS)
    async with AgentClient(EndpointTransport(endpoint)) as client:
        async with client.proxy("session_counter", session_required=True) as counter:
            assert await counter(increment=2) == 2
            assert endpoint.calls == 1  # no separate CreateSession
            assert len(endpoint.store) == 1
            assert await counter(increment=3) == 5
        assert len(endpoint.store) == 0 and endpoint.calls == 3  # + CloseSession


async def test_concurrent_first_calls_open_one_session() -> None:
    endpoint = MemoryEndpoint(TOOLS)
    async with AgentClient(EndpointTransport(endpoint)) as client:
        async with client.proxy("session_counter", session_required=True) as counter:
            results = await asyncio.gather(*(counter(increment=1) for _ in range(20)))
            assert sorted(results) == list(range(1, 21))
            assert endpoint.store.counters["created"] == 1


async def test_a_failed_opening_call_leaves_no_session_and_the_next_opens_one() -> None:
    endpoint = MemoryEndpoint(TOOLS)
    async with AgentClient(EndpointTransport(endpoint)) as client:
        counter = client.proxy("session_counter", session_required=True)
        with pytest.raises(InvalidArguments):
            await counter(increment="many")
        assert counter.session_id is None and len(endpoint.store) == 0
        assert await counter(increment=1) == 1
        await counter.cleanup_auto_session()


async def test_a_session_closed_under_the_proxy_is_lost_never_reopened() -> None:
    endpoint = MemoryEndpoint(TOOLS)
    async with AgentClient(EndpointTransport(endpoint)) as client:
        counter = client.proxy("session_counter", session_required=True)
        await counter(increment=5)
        assert counter.session_id is not None
        await endpoint.store.close(counter.session_id, why="expired")
        with pytest.raises(SessionNotFound):
            await counter(increment=1)
        reached = endpoint.calls
        with pytest.raises(SessionLost, match="cleanup_auto_session"):
            await counter(increment=1)
        assert endpoint.calls == reached  # refused here, not sent
        assert len(endpoint.store) == 0  # and nothing was silently reopened
        await counter.cleanup_auto_session()
        assert await counter(increment=1) == 1  # a new session, on purpose
        await counter.cleanup_auto_session()


async def test_an_unreachable_owner_is_not_a_lost_session() -> None:
    endpoint = MemoryEndpoint(TOOLS)
    async with AgentClient(EndpointTransport(endpoint)) as client:
        async with client.proxy("session_counter", session_required=True) as counter:
            assert await counter(increment=1) == 1
            endpoint.unreachable = True
            with pytest.raises(SessionOwnerUnavailable):
                await counter(increment=1)
            endpoint.unreachable = False
            assert await counter(increment=1) == 2  # the same session, state intact


async def test_an_owner_gone_from_the_mesh_loses_its_sessions_only() -> None:
    a, b = MemoryEndpoint(TOOLS, instance_id="a"), MemoryEndpoint(TOOLS, instance_id="b")
    transport = MemoryTransport(a, b)
    async with AgentClient(transport) as client:
        on_a = client.proxy("session_counter", session_required=True)
        on_b = client.proxy("session_counter", session_required=True)
        await on_a(increment=1)
        await on_b(increment=1)
        owners = [str(p.session_id).partition(".")[0] for p in (on_a, on_b)]
        assert sorted(owners) == ["a", "b"]  # spread over both
        gone, kept = (on_a, on_b) if owners[0] == "a" else (on_b, on_a)
        transport.remove(a)
        with pytest.raises(SessionOwnerLost):
            await gone(increment=1)
        with pytest.raises(SessionLost):
            await gone(increment=1)
        assert await kept(increment=1) == 2
        await gone.cleanup_auto_session()  # nothing to close: its owner is gone
        await kept.cleanup_auto_session()


async def test_a_stateful_proxy_repins_when_its_instance_leaves() -> None:
    a, b = MemoryEndpoint(TOOLS, instance_id="a"), MemoryEndpoint(TOOLS, instance_id="b")
    transport = MemoryTransport(a, b)
    async with AgentClient(transport) as client:
        pinned = client.proxy("add", stateful=True)
        for _ in range(4):
            await pinned(a=1)
        first = a if a.calls else b
        assert first.calls == 4  # every call on one instance
        transport.remove(first)
        other = b if first is a else a
        assert await pinned(a=1) == 1.5
        assert other.calls == 1  # re-pinned, not stuck on the departed one


async def test_a_stream_runs_in_the_auto_session() -> None:
    endpoint = MemoryEndpoint(TOOLS)
    async with AgentClient(EndpointTransport(endpoint)) as client:
        async with client.proxy("session_counter", session_required=True) as counter:
            await counter(increment=7)
            chunks = [c async for c in counter.call_tool_auto("stream_count", {"n": 2})]
            assert chunks == [{"i": 1, "count": 7}, {"i": 2, "count": 7}]
            assert (await counter("peek", {}))["count"] == 7
        assert len(endpoint.store) == 0
