"""Sessions that move: on demand between live replicas, a retried call across a move, a
state that cannot move, hibernation and the cap of live sessions (durable, on real Redis).

Agents run in this process (real gRPC servers on loopback) with a real registry process;
draining as processes (SIGTERM) is in test_mesh.py and the chaos test in test_move_chaos.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from sessionmesh import mesh
from sessionmesh.errors import SessionNotFound, TooManySessions, UsageError
from sessionmesh.server import Agent
from sessionmesh.testing import eventually
from sessionmesh.v1 import session_service_pb2 as pb
from sessionmesh.wire.names import is_durable
from tests.redis_server import Redis, redis_server
from tests.tools import increment, peek

pytestmark = [pytest.mark.anyio]

moved_calls: list[int] = []


@mesh.tool(session_required=True)
def keep(session: mesh.Session, value: Any) -> int:
    """Keep ``value`` (a set has no JSON form: such a session cannot move)."""
    session.state.setdefault("kept", []).append(value)
    return len(session.state["kept"])


@mesh.tool(session_required=True)
def keep_a_set(session: mesh.Session) -> None:
    session.state["set"] = {1, 2}


released = asyncio.Event()


@mesh.tool(session_required=True)
async def hold(session: mesh.Session) -> int:
    """Hold the session's turn until the test lets go."""
    session.state["held"] = session.state.get("held", 0) + 1
    await released.wait()
    return int(session.state["held"])


TOOLS: list[Callable[..., Any]] = [increment, peek, keep, keep_a_set, hold]


@contextlib.asynccontextmanager
async def replicas(
    reg: str, n: int, **settings: Any
) -> AsyncIterator[tuple[list[Agent], mesh.MeshClient]]:
    async with contextlib.AsyncExitStack() as stack:
        agents = [
            await stack.enter_async_context(Agent(TOOLS, name="counter", registry=reg, **settings))
            for _ in range(n)
        ]
        client = await stack.enter_async_context(mesh.connect(registry=reg))

        def all_listed() -> bool:
            listed = [i for i in client.instances() if i.agent_name == "counter"]
            return len(listed) == n and all(len(a.mesh.instances()) >= n for a in agents)  # type: ignore[union-attr]

        await eventually(all_listed, what=f"{n} counter instances seen by all")
        yield agents, client


def holder(agents: list[Agent], session_id: str) -> Agent:
    (agent,) = [a for a in agents if session_id in a.sessions]
    return agent


async def test_sessions_move_on_demand_and_their_callers_follow(reg: str) -> None:
    async with replicas(reg, 2) as ((a, b), client):
        proxies = [client.proxy("session_counter", session_required=True) for _ in range(6)]
        for p in proxies:
            assert await p(increment=1) == 1
        on_a = len(a.sessions)
        assert on_a and len(b.sessions)
        moved = await client.move_sessions("counter", b.instance_id, count=on_a)
        assert (moved.moved, moved.stayed) == (on_a, ())
        assert len(a.sessions) == 0 and len(b.sessions) == 6
        for p in proxies:  # the state went along; calls follow the redirect
            assert await p(increment=1) == 2
        # One session by id, back to A.
        sid = proxies[0].session_id
        assert sid is not None
        assert (await client.move_sessions("counter", a.instance_id, session=sid)).moved == 1
        assert await proxies[0](increment=1) == 3
        assert holder([a, b], sid) is a
        for p in proxies:
            await p.cleanup_auto_session()
        assert len(a.sessions) + len(b.sessions) == 0  # closed where each lives now
        with pytest.raises(UsageError, match="not a serving replica"):
            await client.move_sessions("counter", "nobody")


async def test_a_retried_call_after_a_move_is_answered_from_the_moved_memory(reg: str) -> None:
    async with replicas(reg, 2) as ((a, b), client):
        counter = client.proxy("session_counter", session_required=True)
        assert await counter(increment=1) == 1
        sid = counter.session_id
        assert sid is not None
        source = holder([a, b], sid)
        target = b if source is a else a
        request = pb.CallRequest(tool="session_counter", call_id="c-1")
        request.arguments.update({"increment": 5})
        async with mesh.connect(source.address) as direct:
            endpoint = direct._transport.pick()  # the wire itself: a call id and a session
            message = pb.ExchangeRequest(call=request, session_id=sid)
            first = await endpoint.call(message, None)
            assert first.error is None and first.value.number_value == 6
        assert (await client.move_sessions("counter", target.instance_id, session=sid)).moved
        async with mesh.connect(target.address) as direct:
            endpoint = direct._transport.pick()
            again = await endpoint.call(pb.ExchangeRequest(call=request, session_id=sid), None)
            assert again.error is None and again.value.number_value == 6  # not run twice
        assert await counter(increment=1) == 7


async def test_a_session_whose_state_cannot_move_stays_and_says_why(
    reg: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with replicas(reg, 2) as ((a, b), client):
        proxy = client.proxy("keep_a_set", session_required=True)
        await proxy()
        sid = proxy.session_id
        assert sid is not None
        source = holder([a, b], sid)
        target = b if source is a else a
        with caplog.at_level(logging.WARNING, "sessionmesh.move"):
            moved = await client.move_sessions("counter", target.instance_id, session=sid)
        assert moved.moved == 0
        assert "only a JSON state moves" in moved.stayed[0] and sid not in moved.stayed[0]
        assert sid[:14] in caplog.text and sid not in caplog.text  # ids shortened
        assert holder([a, b], sid) is source
        await proxy()  # it works where it stayed
        await proxy.cleanup_auto_session()


async def test_a_close_racing_a_move_closes_the_session_where_it_went(reg: str) -> None:
    released.clear()
    async with replicas(reg, 2) as ((a, b), client):
        holding = client.proxy("hold", session_required=True)
        call = asyncio.create_task(holding())
        await eventually(lambda: len(a.sessions) + len(b.sessions) == 1, what="its session")
        (sid,) = [s.id for agent in (a, b) for s in agent.sessions.sessions()]
        source = holder([a, b], sid)
        target = b if source is a else a
        # The move waits for the running call; the close waits for the move.
        move = asyncio.create_task(client.move_sessions("counter", target.instance_id, session=sid))
        await eventually(lambda: source.sessions.moving(sid) is not None, what="the move waits")
        close = asyncio.create_task(holding.close_session(sid))
        released.set()
        assert await call == 1
        assert (await move).moved == 1
        assert await close is True  # followed the session to its new owner, closed it there
        assert sid not in source.sessions and sid not in target.sessions


async def test_a_session_stays_when_its_target_refuses_it(reg: str) -> None:
    async with replicas(reg, 2, max_sessions=1) as ((a, b), client):
        first = client.proxy("session_counter", session_required=True)
        second = client.proxy("session_counter", session_required=True)
        assert await first(increment=1) == 1
        assert await second(increment=1) == 1  # one on each (each holds one at most)
        sid = first.session_id
        assert sid is not None
        source = holder([a, b], sid)
        target = b if source is a else a
        moved = await client.move_sessions("counter", target.instance_id, session=sid)
        assert moved.moved == 0 and "max_sessions=1" in moved.stayed[0]
        assert await first(increment=1) == 2  # untouched, where it was
        for p in (first, second):
            await p.cleanup_auto_session()


# -- durable: hibernation and the cap ---------------------------------------------------------


@pytest.fixture
async def store() -> AsyncIterator[Redis]:
    async with redis_server() as server:
        yield server


async def test_an_idle_durable_session_hibernates_and_wakes_where_it_is_called(
    store: Redis, reg: str
) -> None:
    async with replicas(reg, 2, session_store=store.url, hibernate_after=0.2) as (agents, client):
        counter = client.proxy("session_counter", session_required=True)
        assert await counter(increment=2) == 2
        sid = counter.session_id
        assert sid is not None and is_durable(sid)
        # Its first owner (it may have hibernated already: it is idle from here on).
        owner = next(a for a in agents if sid.startswith(a.instance_id))
        await eventually(lambda: sid not in owner.sessions, what="the idle session hibernates")
        assert owner.sessions.counters["hibernated"] == 1
        assert await store.keys() == 1  # its state waits in the store
        assert await counter(increment=3) == 5  # woken by its next call, state and all
        assert sum(sid in a.sessions for a in agents) <= 1  # never two live copies
        await counter.cleanup_auto_session()
        assert await store.keys() == 0


async def test_a_hibernated_session_that_expires_leaves_nothing_in_the_store(
    store: Redis,
) -> None:
    async with (
        Agent(
            TOOLS, name="counter", session_store=store.url, hibernate_after=0.1, session_ttl=1
        ) as agent,
        mesh.connect(agent.address) as client,
    ):
        counter = client.proxy("session_counter", session_required=True)
        assert await counter(increment=1) == 1
        await eventually(lambda: len(agent.sessions) == 0, what="the session hibernates")
        await eventually(lambda: _no_keys(store), within=5.0, what="its record expires")
        with pytest.raises(SessionNotFound):
            await counter(increment=1)


async def _no_keys(store: Redis) -> bool:
    return await store.keys() == 0


async def test_at_most_max_live_sessions_are_in_memory_and_none_is_lost(store: Redis) -> None:
    async with (
        Agent(TOOLS, name="counter", session_store=store.url, max_live_sessions=32) as agent,
        mesh.connect(agent.address) as client,
    ):
        peak = 0
        proxies = [client.proxy("session_counter", session_required=True) for _ in range(200)]
        for round_ in (1, 2):
            for p in proxies:
                assert await p(increment=1) == round_  # every one wakes with its count
                peak = max(peak, len(agent.sessions))
        assert peak <= 32
        assert agent.sessions.counters["hibernated"] >= 200 - 32
        for p in proxies:
            await p.cleanup_auto_session()
        assert await store.keys() == 0


async def test_the_cap_refuses_new_sessions_when_none_can_hibernate(reg: str) -> None:
    async with (
        Agent(TOOLS, name="counter", max_live_sessions=2) as agent,
        mesh.connect(agent.address) as client,
    ):
        kept = [client.proxy("session_counter", session_required=True) for _ in range(2)]
        for p in kept:
            await p(increment=1)
        with pytest.raises(TooManySessions, match="max_live_sessions=2"):
            await client.proxy("session_counter", session_required=True)(increment=1)
        for p in kept:  # the sessions in memory are untouched
            assert await p(increment=1) == 2
            await p.cleanup_auto_session()


async def test_hibernation_needs_a_store() -> None:
    with pytest.raises(UsageError, match="needs a session store"):
        Agent(TOOLS, name="counter", hibernate_after=5)


async def test_draining_redirects_durable_sessions_and_the_next_replica_adopts_them(
    store: Redis, reg: str
) -> None:
    async with replicas(reg, 3, session_store=store.url) as (agents, client):
        proxies = [client.proxy("session_counter", session_required=True) for _ in range(9)]
        for p in proxies:
            assert await p(increment=1) == 1
        stopping = holder(agents, proxies[0].session_id or "")
        await stopping.stop()
        results = await asyncio.gather(*(p(increment=1) for p in proxies))
        assert results == [2] * 9
        for p in proxies:
            await p.cleanup_auto_session()
        assert await store.keys() == 0
