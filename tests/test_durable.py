"""Durable sessions on a real Redis: write-through, takeover, fencing, exactly once, store down.

Agents run in this process (real gRPC servers on loopback) against a real registry process
and a real redis-server; the process-level chaos and pause tests are in test_durable_chaos.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from sessionmesh import mesh
from sessionmesh.errors import (
    CallTimeout,
    Code,
    SessionLost,
    SessionNotFound,
    SessionStoreUnavailable,
    StateNotJson,
    UsageError,
)
from sessionmesh.server import Agent
from sessionmesh.testing import eventually
from sessionmesh.v1 import session_service_pb2 as pb
from sessionmesh.v1 import session_service_pb2_grpc as pb_grpc
from sessionmesh.wire.names import is_durable
from tests.pki import Pki
from tests.redis_server import Redis, redis_server
from tests.tools import add, increment, peek, stream_count

pytestmark = [pytest.mark.anyio]

closed: list[int] = []


@mesh.tool(session_required=True)
def remember(session: mesh.Session, key: str, value: Any = None, kind: str = "") -> int:
    """Put ``value`` under ``key`` (as a set or a tuple, if asked: JSON has neither); how
    many keys there are."""
    if "closing" not in session.state:
        session.state["closing"] = True
        session.on_close(lambda: closed.append(len(session.state)))
    session.state[key] = {"set": set, "tuple": tuple}.get(kind, lambda v: v)(value)
    return len(session.state)


@mesh.tool(session_required=True)
async def slow_increment(session: mesh.Session, seconds: float) -> int:
    """Count, then take ``seconds`` to answer."""
    session.state["count"] = session.state.get("count", 0) + 1
    await asyncio.sleep(seconds)
    return int(session.state["count"])


@mesh.tool(session_required=True, streaming=True)
async def counting(session: mesh.Session, n: int) -> AsyncIterator[int]:
    """Count once per chunk sent."""
    for _ in range(n):
        session.state["count"] = session.state.get("count", 0) + 1
        yield session.state["count"]


TOOLS: list[Callable[..., Any]] = [
    increment,
    peek,
    stream_count,
    remember,
    slow_increment,
    counting,
]


@pytest.fixture
async def store() -> AsyncIterator[Redis]:
    async with redis_server() as server:
        yield server


@contextlib.asynccontextmanager
async def replicas(
    store: Redis, reg: str, n: int, **settings: Any
) -> AsyncIterator[tuple[list[Agent], mesh.MeshClient]]:
    """``n`` replicas of the counter agent on one store, and a client that sees them all."""
    async with contextlib.AsyncExitStack() as stack:
        agents = [
            await stack.enter_async_context(
                Agent(TOOLS, name="counter", registry=reg, session_store=store.url, **settings)
            )
            for _ in range(n)
        ]
        client = await stack.enter_async_context(mesh.connect(registry=reg))
        await eventually(
            lambda: len([i for i in client.instances() if i.agent_name == "counter"]) == n,
            what=f"{n} counter instances in the registry",
        )
        yield agents, client


async def raw_call(
    agent: Agent, session_id: str, tool: str, call_id: str = "", **arguments: Any
) -> Any:
    """A call with the session id alone, as grpcurl or another language makes it: the
    result as the wire carries it (a number, or a Struct)."""
    async with grpc.aio.insecure_channel(agent.address) as channel:
        request = pb.CallRequest(tool=tool, call_id=call_id)
        request.arguments.update(arguments)
        reply = await pb_grpc.SessionServiceStub(channel).Call(
            request, metadata=(("x-session-id", session_id),)
        )
    kind = reply.result.WhichOneof("kind")
    return reply.result.number_value if kind == "number_value" else reply.result.struct_value


def owner_first(agents: list[Agent], session_id: str) -> list[Agent]:
    """The agents, the one whose instance opened ``session_id`` first."""
    return sorted(agents, key=lambda agent: not session_id.startswith(agent.instance_id))


def opened(proxy: mesh.Proxy, agents: list[Agent]) -> tuple[str, list[Agent]]:
    """The proxy's auto session (open by now), and the agents with its owner first."""
    sid = proxy.session_id
    assert sid is not None
    return sid, owner_first(agents, sid)


async def test_a_session_continues_on_another_replica_when_its_owner_stops(
    store: Redis, reg: str
) -> None:
    async with replicas(store, reg, 2) as (agents, client):
        async with client.proxy("session_counter", session_required=True) as counter:
            assert [await counter(increment=n) for n in (1, 2, 3)] == [1, 3, 6]
            sid, (owner, other) = opened(counter, agents)
            assert is_durable(sid)
            await owner.stop()  # a graceful stop releases it: the session lives on in Redis
            assert await counter(increment=4) == 10
            assert sid in other.sessions
            assert await counter("peek") == {"count": 10, "id": sid}
            # A stream runs in the same session, on its new owner.
            chunks = [c async for c in counter.call_tool_auto("stream_count", {"n": 2})]
            assert chunks == [{"i": 1, "count": 10}, {"i": 2, "count": 10}]
        # Leaving the block closed it everywhere: the record is gone.
        assert sid not in other.sessions
        assert await store.keys() == 0


async def test_a_stale_owner_is_fenced_and_the_caller_follows_the_new_one(
    store: Redis, reg: str
) -> None:
    async with replicas(store, reg, 2) as (agents, client):
        counter = client.proxy("session_counter", session_required=True)
        assert await counter(increment=5) == 5
        sid, (owner, other) = opened(counter, agents)
        # Another caller (grpcurl-like: the id alone) sends a call to the other replica:
        # it adopts the session from the store, and the first owner's copy is now stale.
        assert await raw_call(other, sid, "increment", increment=100) == 105
        assert sid in other.sessions and sid in owner.sessions
        # The proxy still sends to the first owner: its save is refused (a higher epoch),
        # it drops its copy, and the proxy follows to the new owner, where the call runs
        # once, on the saved state.
        assert await counter(increment=1) == 106
        assert sid not in owner.sessions
        assert await counter("peek") == {"count": 106, "id": sid}
        await counter.cleanup_auto_session()
        assert await store.keys() == 0


async def test_a_retried_call_after_a_takeover_returns_its_saved_outcome(
    store: Redis, reg: str
) -> None:
    async with replicas(store, reg, 2) as (agents, client):
        async with client.proxy("session_counter", session_required=True) as counter:
            assert await counter(increment=1) == 1
            sid, (owner, other) = opened(counter, agents)
            # A call with a call id runs on the owner and is saved; its answer is "lost".
            assert await raw_call(owner, sid, "increment", "retry-me", increment=10) == 11
            # The retry goes to the other replica (say the owner died meanwhile): it
            # adopts the session and answers with the saved outcome, not a second run.
            assert await raw_call(other, sid, "increment", "retry-me", increment=10) == 11
            assert (await raw_call(other, sid, "peek"))["count"] == 11
            assert other.sessions.get(sid).durable.epoch == 2


async def test_a_state_with_no_json_form_fails_the_call_and_keeps_the_saved_state(
    store: Redis,
) -> None:
    closed.clear()
    async with (
        Agent(TOOLS, name="counter", session_store=store.url) as agent,
        mesh.connect(agent.address) as client,
    ):
        async with client.proxy("remember", session_required=True) as remember_:
            assert await remember_(key="a", value=1) == 2
            with pytest.raises(StateNotJson) as caught:
                await remember_(key="tags", value=["x"], kind="set")
            assert caught.value.key == "tags"
            assert "session.state['tags'] has no JSON form" in caught.value.message
            assert "keeps its last saved state" in caught.value.message
            # Nothing of the refused call is left; the session goes on.
            assert await remember_(key="b", value=[1, 2]) == 3
            with pytest.raises(StateNotJson, match=r"state\['t'\] holds a tuple"):
                await remember_(key="t", value=[1, 2], kind="tuple")
        # Closed by its owner: the close callback ran once, with the saved state.
        assert closed == [3]


async def test_calls_fail_typed_while_the_store_is_down_and_succeed_when_it_is_back(
    reg: str,
) -> None:
    async with redis_server(append_only=True) as store:
        async with replicas(store, reg, 1) as (_, client):
            durable = client.proxy("session_counter", session_required=True)
            assert await durable(increment=1) == 1
            await store.kill()
            with pytest.raises(SessionStoreUnavailable) as caught:
                await durable(increment=1)
            assert caught.value.code == Code.UNAVAILABLE
            assert "nothing was saved" in caught.value.message
            # Non-durable sessions of another agent are unaffected.
            async with Agent(TOOLS, name="plain") as plain, mesh.connect(plain.address) as c:
                async with c.proxy("session_counter", session_required=True) as p:
                    assert [await p(increment=1) for _ in range(2)] == [1, 2]
            await store.start()
            # The failed call changed nothing: the count is as last saved.
            assert await durable(increment=1) == 2
            retrying = durable.options(retry_count=5, retry_delay=0.2)
            await store.kill()
            await store.start()
            assert await retrying(increment=1) == 3
            await durable.cleanup_auto_session()


async def test_an_agent_whose_store_is_down_at_start_says_so_and_serves(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        url = f"redis://127.0.0.1:{held.getsockname()[1]}/0"
        with caplog.at_level(logging.WARNING, logger="sessionmesh.agent"):
            async with (
                Agent([*TOOLS, add], name="counter", session_store=url) as agent,
                mesh.connect(agent.address) as client,
            ):
                assert f"until the store answers: session store {url}" in caplog.text
                assert await client.proxy("add")(a=1, b=1) == 2  # no session: served
                with pytest.raises(SessionStoreUnavailable):
                    await client.proxy("session_counter", session_required=True)(increment=1)


async def test_a_closed_or_expired_session_is_lost_everywhere(store: Redis, reg: str) -> None:
    async with replicas(store, reg, 2, session_ttl=60) as (agents, client):
        counter = client.proxy("session_counter")
        sid = await counter.create_session()
        assert await counter.call_with_session(session_id=sid, increment=2) == 2
        other = owner_first(agents, sid)[1]
        assert await counter.close_session(sid)
        # Another replica finds nothing to adopt: lost, as a forged id would be.
        async with mesh.connect(other.address) as direct:
            with pytest.raises(SessionNotFound):
                await direct.proxy("increment").call_with_session(session_id=sid, increment=1)


async def test_a_session_store_url_is_checked_at_once() -> None:
    with pytest.raises(UsageError, match="redis://HOST:PORT/DB"):
        Agent(TOOLS, session_store="postgres://x")
    # State would cross the network in the clear: TLS, or a deliberate --insecure.
    with pytest.raises(UsageError, match=r"rediss:// \(TLS\), or --insecure"):
        Agent(TOOLS, session_store="redis://10.0.0.5:6379/0")
    Agent(TOOLS, session_store="redis://10.0.0.5:6379/0", insecure=True)
    Agent(TOOLS, session_store="rediss://10.0.0.5:6379/0")


async def test_an_idle_session_expires_in_the_store_too_and_its_callbacks_run_once(
    store: Redis,
) -> None:
    closed.clear()
    async with (
        Agent(TOOLS, name="counter", session_store=store.url, session_ttl=30) as agent,
        mesh.connect(agent.address) as client,
    ):
        remember_ = client.proxy("remember", session_required=True)
        assert await remember_(key="a", value=1) == 2
        # The record lives as long as the session may idle, refreshed by every save.
        ((key, ttl),) = (await store.ttls()).items()
        assert b"sessionmesh:counter:session:" in key and 25_000 < ttl <= 30_000
        sid = remember_.session_id
        assert sid is not None and sid.split(".")[1] not in key.decode()  # no secret in keys
        await agent.stop()
        # Stopping released it (no callback): it waits in the store for another replica.
        assert closed == [] and await store.keys() == 1
    async with (
        Agent(TOOLS, name="counter", session_store=store.url, session_ttl=0.3) as agent,
        mesh.connect(agent.address) as client,
    ):
        remember_ = client.proxy("remember", session_required=True)
        assert await remember_(key="a", value=1) == 2
        await eventually(lambda: len(agent.sessions) == 0, what="the idle session expires")
        await eventually(lambda: closed == [2], what=f"its close callback ran once ({closed})")
        with pytest.raises(SessionNotFound):
            await remember_(key="b")
        assert await store.keys() == 1  # only the released one of the first agent


async def test_a_call_cut_off_by_its_deadline_is_rolled_back(store: Redis) -> None:
    async with (
        Agent(TOOLS, name="counter", session_store=store.url) as agent,
        mesh.connect(agent.address) as client,
    ):
        async with client.proxy("slow_increment", session_required=True) as slow:
            assert await slow(seconds=0) == 1
            with pytest.raises(CallTimeout):
                await slow.options(timeout=0.2)(seconds=5)
            # Never answered, never saved: the count it made is gone, here and in the store.
            assert await slow(seconds=0) == 2
            assert await slow("peek") == {"count": 2, "id": slow.session_id}


async def test_a_rediss_store_is_dialled_with_the_agents_own_tls(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    cert, key = pki.issue("redis", "127.0.0.1")
    async with redis_server(tls=(cert, key, pki.ca_file)) as store:
        assert store.url.startswith("rediss://")
        tls = pki.server(client_ca=False)  # its CA verifies Redis; its cert is shown to it
        async with (
            Agent(TOOLS, name="counter", session_store=store.url, tls=tls) as agent,
            mesh.connect(agent.address, tls=mesh.TLS(ca=pki.ca_file)) as client,
        ):
            async with client.proxy("session_counter", session_required=True) as counter:
                assert [await counter(increment=n) for n in (1, 2)] == [1, 3]
                assert await store.keys() == 1
        # Without a certificate Redis accepts, the store is unavailable: typed, not a hang.
        async with (
            Agent(TOOLS, name="counter", session_store=store.url) as agent,
            mesh.connect(agent.address) as client,
        ):
            with pytest.raises(SessionStoreUnavailable):
                await client.proxy("session_counter", session_required=True)(increment=1)


async def test_calls_in_flight_at_a_takeover_keep_their_order_on_one_new_owner(
    store: Redis, reg: str
) -> None:
    async with replicas(store, reg, 3) as (agents, client):
        async with client.proxy("session_counter", session_required=True) as counter:
            assert await counter(increment=1) == 1
            sid, (owner, *others) = opened(counter, agents)
            await owner.stop()
            counts = await asyncio.gather(*(counter(increment=1) for _ in range(20)))
            assert counts == list(range(2, 22))  # arrival order, each applied once
            holders = [r for r in others if sid in r.sessions]
            assert len(holders) == 1  # one adopter; the session never bounced


async def test_a_stream_counts_when_it_ends_and_a_stream_cut_off_is_rolled_back(
    store: Redis,
) -> None:
    async with (
        Agent(TOOLS, name="counter", session_store=store.url) as agent,
        mesh.connect(agent.address) as client,
    ):
        async with client.proxy("increment", session_required=True) as counter:
            assert [c async for c in counter.call_tool_auto("counting", {"n": 3})] == [1, 2, 3]
            chunks = counter.options(buffer_size=1).call_tool_auto("counting", {"n": 1000})
            assert [await anext(chunks), await anext(chunks)] == [4, 5]
            await chunks.aclose()  # cut off: what it counted is not kept
            assert await counter("peek") == {"count": 3, "id": counter.session_id}
            assert await counter(increment=1) == 4


@pytest.mark.parametrize("owner_stopped", [False, True])
async def test_a_store_that_lost_the_session_says_so_and_never_hands_back_an_empty_one(
    store: Redis, reg: str, owner_stopped: bool
) -> None:
    # Redis without persistence restarted, or a failover to a replica that lagged: the
    # record is gone. The owner's copy (or, once it stopped, the adopter) must not carry on
    # as if the session were new: the caller is told the session is not found.
    async with replicas(store, reg, 2) as (agents, client):
        async with client.proxy("session_counter", session_required=True) as counter:
            assert await counter(increment=2) == 2
            sid, (owner, _) = opened(counter, agents)
            if owner_stopped:
                await owner.stop()  # released: the next call adopts it elsewhere
            flushed = store.client()
            try:
                await flushed.flushall()
            finally:
                await flushed.aclose()
            with pytest.raises(SessionNotFound):
                await counter(increment=1)
            with pytest.raises(SessionLost):  # lost for good: never reopened empty
                await counter(increment=1)
        assert all(sid not in agent.sessions for agent in agents)


async def test_leaving_the_client_with_no_replica_left_raises_nothing_and_releases_all(
    store: Redis, reg: str, caplog: pytest.LogCaptureFixture
) -> None:
    # It used to raise AgentUnavailable out of aclose() and leave the connections open.
    async with replicas(store, reg, 1) as (agents, client):
        counter = client.proxy("session_counter", session_required=True)
        assert await counter(increment=1) == 1
        await agents[0].stop()  # released to the store; no replica is left to close it
        with caplog.at_level(logging.WARNING, logger="sessionmesh.proxy"):
            await client.aclose()  # what leaving `async with mesh.connect(...)` does
        assert "not closed" in caplog.text
        assert client._pool.closed  # every connection released
    assert await store.keys() > 0  # the session waits in its store for its TTL


async def test_a_redirect_is_followed_even_to_an_instance_that_failed_a_moment_ago(
    store: Redis, reg: str
) -> None:
    # The proxy once raised SessionElsewhere: the new owner was an instance it had marked
    # failed in the last seconds, so it went back to the replica that had just refused it.
    async with replicas(store, reg, 2) as (agents, client):
        counter = client.proxy("session_counter", session_required=True)
        assert await counter(increment=5) == 5
        sid, (_, other) = opened(counter, agents)
        assert await raw_call(other, sid, "increment", increment=100) == 105  # taken over
        client._pool.failed_at[other.instance_id] = time.monotonic()  # "failed" just now
        # The stale copy answers SESSION_ELSEWHERE naming `other`: followed, not doubted.
        assert await counter(increment=1) == 106
        await counter.cleanup_auto_session()


async def test_closing_a_moved_session_closes_it_where_it_lives(store: Redis, reg: str) -> None:
    # The close used to go to the instance named in the id (the proxy forgot where the
    # session had moved before asking): the record went, but the new owner kept its copy
    # open until its idle expiry.
    async with replicas(store, reg, 2) as (agents, client):
        counter = client.proxy("remember", session_required=True)
        assert await counter(key="a") == 2  # the "closing" marker and "a"
        sid, (first, other) = opened(counter, agents)
        assert await raw_call(other, sid, "remember", key="b") == 3  # taken over
        assert await counter(key="c") == 4  # the proxy followed it there
        assert sid not in first.sessions and sid in other.sessions
        await counter.cleanup_auto_session()
        assert sid not in other.sessions  # closed where it lived
        assert await store.keys() == 0
