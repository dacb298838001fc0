"""The design note's session flows over real gRPC on 127.0.0.1."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import grpc
import pytest

from sessionmesh import mesh
from sessionmesh.errors import (
    AgentUnavailable,
    SessionLost,
    SessionNotFound,
    SessionRequired,
    TooManySessions,
)
from sessionmesh.testing import eventually, running_agent
from tests.tools import increment, peek

pytestmark = pytest.mark.anyio


async def test_three_rounds_in_one_auto_session() -> None:
    async with running_agent(increment, peek) as (agent, client):
        counter = client.proxy("session_counter", session_required=True)
        assert counter.session_id is None
        async with counter:
            counts = [await counter(increment=n) for n in (1, 2, 3)]
            assert counts == [1, 3, 6]
            sid = counter.session_id
            assert sid is not None and sid.startswith(agent.instance_id + ".")
            assert (await counter("peek", {}))["id"] == sid
            assert (await counter.call_tool("peek"))["count"] == 6
            assert len(agent.sessions) == 1
        assert counter.session_id is None
        assert len(agent.sessions) == 0


class CountRpcs(grpc.aio.ServerInterceptor):
    """Records the method of every RPC the agent receives."""

    def __init__(self) -> None:
        self.methods: list[str] = []

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        self.methods.append(details.method.rpartition("/")[2])
        return await continuation(details)


async def test_first_call_opens_the_session_without_an_extra_rpc() -> None:
    rpcs = CountRpcs()
    async with running_agent(increment, interceptors=[rpcs]) as (agent, client):
        async with client.proxy("increment", session_required=True) as counter:
            await counter()
            assert agent.sessions.counters["created"] == 1
            assert rpcs.methods == ["Exchange"]  # the call itself, on the shared stream
            await counter()
            assert rpcs.methods == ["Exchange"]  # and every later one
        assert rpcs.methods == ["Exchange", "CloseSession"]


async def test_new_scope_starts_a_fresh_session() -> None:
    async with running_agent(increment) as (agent, client):
        counter = client.proxy("session_counter", session_required=True)
        async with counter:
            assert await counter(increment=5) == 5
            first = counter.session_id
        async with counter:
            assert await counter(increment=1) == 1
            assert counter.session_id != first
        other = client.proxy("session_counter", session_required=True)
        async with other:
            assert await other(increment=2) == 2
        assert len(agent.sessions) == 0


async def test_caller_raising_midway_still_closes_the_session() -> None:
    async with running_agent(increment) as (agent, client):
        with pytest.raises(RuntimeError, match="caller failed"):
            async with client.proxy("session_counter", session_required=True) as counter:
                await counter(increment=1)
                assert len(agent.sessions) == 1
                raise RuntimeError("caller failed")
        assert len(agent.sessions) == 0


async def test_cleanup_auto_session_closes_and_next_call_reopens() -> None:
    async with running_agent(increment) as (agent, client):
        counter = client.proxy("session_counter", session_required=True)
        assert await counter(increment=1) == 1
        await counter.cleanup_auto_session()
        assert len(agent.sessions) == 0
        assert await counter(increment=1) == 1
        await counter.cleanup_auto_session()
        await counter.cleanup_auto_session()  # idempotent


async def test_manual_sessions_are_real_rpcs() -> None:
    async with running_agent(increment) as (agent, client):
        counter = client.proxy("session_counter")
        sid = await counter.create_session()
        assert len(agent.sessions) == 1
        results = [await counter.call_with_session(session_id=sid, increment=n) for n in (1, 2, 3)]
        assert results == [1, 3, 6]
        assert await counter.close_session(sid) is True
        assert await counter.close_session(sid) is False  # idempotent
        assert len(agent.sessions) == 0
        with pytest.raises(SessionNotFound) as info:
            await counter.call_with_session(session_id=sid, increment=1)
        assert info.value.session_id == sid


async def test_session_required_tool_refuses_a_call_without_session() -> None:
    async with running_agent(increment) as (agent, client):
        # What to write in Python, not the metadata grpcurl users need (the agent's text).
        with pytest.raises(SessionRequired, match=r"session_required=True"):
            await client.proxy("session_counter")(increment=1)
        with pytest.raises(SessionRequired, match=r"session_required=True"):
            async for _ in client.proxy("session_counter").stream(increment=1):
                pass
        assert len(agent.sessions) == 0


async def test_options_copy_shares_the_auto_session() -> None:
    async with running_agent(increment) as (_, client):
        async with client.proxy("session_counter", session_required=True) as counter:
            await counter(increment=1)
            patient = counter.options(timeout=30.0)
            assert patient.settings.timeout == 30.0 and counter.settings.timeout is None
            assert await patient(increment=1) == 2
            assert patient.session_id == counter.session_id


async def test_concurrent_first_calls_share_one_session() -> None:
    async with running_agent(increment) as (agent, client):
        async with client.proxy("session_counter", session_required=True) as counter:
            results = await asyncio.gather(*(counter(increment=1) for _ in range(10)))
            assert sorted(results) == list(range(1, 11))
            assert agent.sessions.counters["created"] == 1


async def test_calls_in_one_session_run_one_at_a_time_in_arrival_order() -> None:
    release = asyncio.Event()
    order: list[int] = []
    running = 0
    peak = 0

    @mesh.tool(session_required=True)
    async def step(session: mesh.Session, seq: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        if seq == 0:
            await release.wait()
        if seq < 0:
            running -= 1
            return seq
        order.append(seq)
        await asyncio.sleep(0)  # give another call the chance to overlap, were it allowed to
        running -= 1
        return seq

    async with running_agent(step) as (agent, client):
        proxy = client.proxy("step")
        # The calls share the client's Exchange stream: each reaches the agent while
        # call 0 runs and queues there on the session's line.
        sid = await proxy.create_session()
        session = agent.sessions.get(sid)
        first = asyncio.create_task(proxy.call_with_session(session_id=sid, seq=0))
        await eventually(lambda: running == 1, what="call 0 running")
        tasks = [first]
        for seq in range(1, 20):
            tasks.append(asyncio.create_task(proxy.call_with_session(session_id=sid, seq=seq)))
            # Wait until call `seq` has reached the agent and queues behind the others,
            # so that arrival order is known.
            await eventually(partial(lambda n: session.waiting == n, seq), what=f"call {seq}")
        release.set()
        assert await asyncio.gather(*tasks) == list(range(20))
    assert order == list(range(20))
    assert peak == 1


async def test_concurrent_calls_through_one_auto_session_keep_their_order() -> None:
    order: list[int] = []
    running = 0
    peak = 0

    @mesh.tool(session_required=True)
    async def step(session: mesh.Session, seq: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        order.append(seq)
        await asyncio.sleep(0)
        running -= 1
        return seq

    async with running_agent(step) as (_, client):
        async with client.proxy("step", session_required=True) as proxy:
            await proxy(seq=-1)
            results = await asyncio.gather(*(proxy(seq=n) for n in range(20)))
    assert list(results) == list(range(20))
    assert order == [-1, *range(20)]
    assert peak == 1


async def test_one_client_sends_a_sessions_calls_in_order_while_others_go_past() -> None:
    release = asyncio.Event()
    order: list[str] = []

    @mesh.tool(session_required=True)
    async def note(session: mesh.Session, label: str, hold: bool = False) -> str:
        order.append(label)
        if hold:
            await release.wait()
        return label

    async with running_agent(note) as (_, client):
        async with (
            client.proxy("note", session_required=True) as mine,
            client.proxy("note", session_required=True) as other,
        ):
            await mine(label="open")
            await other(label="open other")
            first = asyncio.ensure_future(mine(label="a", hold=True))
            await eventually(lambda: "a" in order, what="a running")
            burst = asyncio.ensure_future(
                asyncio.gather(*(mine(label=label) for label in ("b", "c", "d")))
            )
            # Another session is not held up by the first one's long call ...
            assert await other(label="x") == "x"
            assert not burst.done()
            release.set()
            # ... and the first one's calls ran in the order they were made.
            assert await first == "a"
            assert await burst == ["b", "c", "d"]
    assert order == ["open", "open other", "a", "x", "b", "c", "d"]


async def test_two_sessions_run_in_parallel() -> None:
    # Each call waits for the other one to have started: serialised sessions would deadlock.
    started = {"a": asyncio.Event(), "b": asyncio.Event()}

    @mesh.tool(session_required=True)
    async def rendezvous(session: mesh.Session, me: str, other: str) -> str:
        started[me].set()
        await asyncio.wait_for(started[other].wait(), timeout=5)
        return me

    async with running_agent(rendezvous) as (_, client):
        async with (
            client.proxy("rendezvous", session_required=True) as a,
            client.proxy("rendezvous", session_required=True) as b,
        ):
            both = await asyncio.gather(a(me="a", other="b"), b(me="b", other="a"))
            assert list(both) == ["a", "b"]
            assert a.session_id != b.session_id


async def test_idle_session_expires_once_and_is_never_silently_reopened() -> None:
    closed: list[str] = []

    @mesh.tool(session_required=True)
    def remember(session: mesh.Session, value: int) -> int:
        if "value" not in session.state:
            session.on_close(lambda: closed.append(session.id))
        session.state["value"] = value
        return value

    async with running_agent(remember, session_ttl=0.3) as (agent, client):
        proxy = client.proxy("remember", session_required=True)
        async with proxy:
            assert await proxy(value=7) == 7
            sid = proxy.session_id
            await eventually(lambda: len(agent.sessions) == 0, what="the idle session expires")
            assert closed == [sid]
            assert agent.sessions.counters["expired"] == 1
            with pytest.raises(SessionNotFound):
                await proxy(value=8)
            with pytest.raises(SessionLost, match="cleanup_auto_session"):
                await proxy(value=9)  # the proxy refuses to open a fresh, empty session
            assert agent.sessions.counters["created"] == 1
        assert closed == [sid]  # exactly once, the exit's CloseSession found nothing to close


async def test_close_callbacks_run_once_on_close_and_on_agent_stop() -> None:
    events: list[str] = []

    @mesh.tool(session_required=True)
    async def track(session: mesh.Session, name: str) -> None:
        async def on_close() -> None:
            events.append(name)

        session.on_close(on_close)

    async with running_agent(track) as (agent, client):
        async with client.proxy("track", session_required=True) as p:
            await p(name="closed")
        left_open = client.proxy("track", session_required=True)
        await left_open(name="at-stop")
        await agent.stop()
    assert events == ["closed", "at-stop"]


async def test_too_many_sessions() -> None:
    async with running_agent(increment, max_sessions=2) as (_, client):
        proxies = [client.proxy("session_counter", session_required=True) for _ in range(3)]
        await proxies[0]()
        await proxies[1]()
        with pytest.raises(TooManySessions, match="max_sessions=2"):
            await proxies[2]()
        await proxies[0].cleanup_auto_session()
        assert await proxies[2]() == 1
        for p in proxies:
            await p.cleanup_auto_session()


async def test_session_ids_are_long_and_random() -> None:
    async with running_agent(increment) as (agent, client):
        ids = {await client.proxy("increment").create_session() for _ in range(50)}
        assert len(ids) == 50
        for sid in ids:
            prefix, _, secret = sid.partition(".")
            assert prefix == agent.instance_id
            assert len(secret) * 6 >= 128  # url-safe base64 carries 6 bits per character


async def test_session_state_is_per_session() -> None:
    async with running_agent(increment) as (_, client):
        a = client.proxy("session_counter", session_required=True)
        b = client.proxy("session_counter", session_required=True)
        async with a, b:
            assert await a(increment=10) == 10
            assert await b(increment=1) == 1
            assert await a(increment=1) == 11


async def test_current_session_matches_the_injected_one() -> None:
    seen: list[Any] = []

    @mesh.tool(session_required=True)
    async def who(session: mesh.Session) -> bool:
        seen.append(mesh.current_session())
        return mesh.current_session() is session

    @mesh.tool
    def nobody() -> bool:
        return mesh.current_session() is None

    async with running_agent(who, nobody) as (_, client):
        async with client.proxy("who", session_required=True) as p:
            assert await p() is True
        assert await client.proxy("nobody")() is True


async def test_without_auto_session_management_sessions_are_manual() -> None:
    async with running_agent(increment) as (agent, client):
        manual = client.proxy(
            "session_counter", session_required=True, auto_session_management=False
        )
        assert manual.auto_session_management is False
        with pytest.raises(SessionRequired):
            await manual(increment=1)  # nothing opens a session behind your back
        assert len(agent.sessions) == 0
        sid = await manual.create_session()
        assert await manual.call_with_session(session_id=sid, increment=2) == 2
        await manual.close_session(sid)


async def test_a_draining_agent_serves_open_sessions_but_opens_none() -> None:
    async with running_agent(increment) as (agent, client):
        async with client.proxy("session_counter", session_required=True) as open_one:
            assert await open_one(increment=1) == 1
            await agent.drain(within=0)
            assert await open_one(increment=1) == 2  # an open session goes on
            with pytest.raises(AgentUnavailable) as info:
                await client.proxy("session_counter", session_required=True)(increment=1)
            assert info.value.reason == "SHUTTING_DOWN"
            assert len(agent.sessions) == 1


async def test_closing_the_client_closes_the_auto_sessions_of_its_proxies() -> None:
    async with running_agent(increment) as (agent, _):
        async with mesh.connect(agent.address) as client:
            first = client.proxy("session_counter", session_required=True)
            second = first.options(timeout=5)  # shares the first one's session
            other = client.proxy("session_counter", session_required=True)
            await first(increment=1)
            await second(increment=1)
            await other(increment=1)
            assert len(agent.sessions) == 2
        assert len(agent.sessions) == 0  # no `async with proxy`, and still no leak
        assert first.session_id is None and other.session_id is None


async def test_a_proxy_dropped_with_its_session_open_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with running_agent(increment) as (agent, client):
        counter = client.proxy("session_counter", session_required=True)
        await counter(increment=1)
        short = str(counter.session_id)[:14]
        with caplog.at_level(logging.WARNING, logger="sessionmesh.proxy"):
            del counter
            gc.collect()
        dropped = [r.getMessage() for r in caplog.records if "dropped while open" in r.getMessage()]
        assert len(dropped) == 1 and short in dropped[0]
        assert str(agent.sessions.sessions()[0].id) not in dropped[0]  # never the whole id


async def test_plain_tools_run_on_the_agents_own_threads_as_many_as_it_says() -> None:
    release = threading.Event()
    lock = threading.Lock()
    running = 0
    most = 0
    names: set[str] = set()

    @mesh.tool
    def blocking() -> int:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
            names.add(threading.current_thread().name)
        release.wait(10)
        with lock:
            running -= 1
        return 1

    async with running_agent(blocking, name="pool", threads=2) as (_, client):
        calls = [asyncio.create_task(client.proxy("blocking")()) for _ in range(4)]
        await eventually(lambda: running == 2, what="two calls block their threads")
        release.set()
        assert await asyncio.gather(*calls) == [1, 1, 1, 1]
    assert most == 2  # the other two waited for a thread
    assert names and all(n.startswith("sessionmesh-pool") for n in names)


async def test_a_thread_tool_that_timed_out_keeps_its_sessions_turn_until_it_ends() -> None:
    # A thread cannot be stopped: the caller is told ToolTimeout, and the session's next
    # call waits until the thread has really ended, so it never sees a half-written state.
    gate = threading.Event()

    @mesh.tool(session_required=True, timeout=0.2)
    def write(session: mesh.Session, value: int) -> list[int]:
        if value == 1:
            gate.wait(10)  # past its timeout, until the test lets it go on
        log: list[int] = session.state.setdefault("log", [])
        log.append(value)
        return list(log)

    async with running_agent(write) as (agent, client):
        proxy = client.proxy("write")
        sid = await proxy.create_session()
        session = agent.sessions.get(sid)
        try:
            with pytest.raises(mesh.errors.ToolTimeout):
                await proxy.call_with_session(session_id=sid, value=1)
            second = asyncio.create_task(proxy.call_with_session(session_id=sid, value=2))
            await eventually(lambda: session.waiting == 1, what="call 2 waiting its turn")
            assert session.state.get("log", []) == []
            assert not second.done()
        finally:
            gate.set()
        assert await second == [1, 2]
