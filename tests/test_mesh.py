"""The mesh as processes: registry, injection, replicas and affinity, failures, draining."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from sessionmesh import mesh
from sessionmesh.errors import (
    AgentUnavailable,
    SessionElsewhere,
    SessionLost,
    SessionNotFound,
    SessionOwnerLost,
)
from sessionmesh.testing import eventually
from sessionmesh.v1 import registry_service_pb2 as rpb
from sessionmesh.v1 import session_service_pb2 as pb
from sessionmesh.v1 import session_service_pb2_grpc as pb_grpc
from tests.procs import ROOT, exited, open_sessions, registry, serve

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

SERVING = rpb.INSTANCE_STATE_SERVING
UNREACHABLE = rpb.INSTANCE_STATE_UNREACHABLE


def owner(reply: dict[str, Any]) -> str:
    """The instance id in a counter reply's (shortened) session id."""
    return str(reply["session"]).partition(".")[0]


async def instances_of(client: mesh.MeshClient, agent: str, n: int) -> list[str]:
    await eventually(
        lambda: len([i for i in client.instances() if i.agent_name == agent]) == n,
        what=f"{n} {agent} instance(s) registered",
    )
    return [i.instance_id for i in client.instances() if i.agent_name == agent]


async def test_the_design_notes_examples_through_the_registry(reg: str) -> None:
    """Every example of the design note, as shipped in examples/, runs."""
    async with (
        serve("examples/counter.py", "--registry", reg) as (_, counter),
        serve("examples/analytics.py", "--registry", reg) as (_, analytics),
    ):
        async with serve("examples/consumer.py", "--registry", reg):
            async with mesh.connect(registry=reg) as client:
                await instances_of(client, "consumer", 1)
                await instances_of(client, "analytics", 1)
                auto = await client.proxy("auto_session_test")(test_rounds=3)
                assert [r["response"]["count"] for r in auto["results"]] == [1, 3, 6]
                assert len({r["response"]["session"] for r in auto["results"]}) == 1
                manual = await client.proxy("session_test")(test_rounds=3)
                assert [r["response"]["count"] for r in manual["results"]] == [1, 3, 6]
                reliable = await client.proxy("reliable_counter")(amount=5)
                assert reliable["count"] == 5
                streamed = [c async for c in client.proxy("streaming_session_service").stream()]
                assert [c["i"] for c in streamed] == [1, 2, 3]
                analysis = [
                    c async for c in client.proxy("stream_analytics").stream(dataset="a bc")
                ]
                assert [c["word"] for c in analysis] == ["a", "bc"]
                # The synchronous tool: a plain def calling its proxy without await.
                [one] = [c async for c in client.proxy("stateful_service").stream()]
                assert one["count"] == 1
                assert (await client.proxy("my_service")())["count"] == 1
                # The enhanced proxy walkthrough, a script of its own.
                script = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "examples/enhanced_proxy.py",
                    reg,
                    stdout=asyncio.subprocess.PIPE,
                    cwd=ROOT,
                )
                out, _ = await asyncio.wait_for(script.communicate(), 60)
                assert script.returncode == 0
                assert out.decode().rstrip().endswith(": 1, 3")
                for agent in (counter, analytics):  # every flow closed its own session
                    assert await open_sessions(agent["address"]) == 0


async def test_sessions_stay_on_their_replica_across_three(reg: str) -> None:
    async with (
        serve("examples/counter.py", "--registry", reg),
        serve("examples/counter.py", "--registry", reg),
        serve("examples/counter.py", "--registry", reg),
    ):
        async with mesh.connect(registry=reg) as client:
            await instances_of(client, "counter", 3)
            proxies = [client.proxy("session_counter", session_required=True) for _ in range(30)]
            owners: list[set[str]] = [set() for _ in proxies]
            for round_ in range(1, 6):
                replies = await asyncio.gather(*(p(increment=1) for p in proxies))
                for i, reply in enumerate(replies):
                    assert reply["count"] == round_  # state carried over: same instance
                    owners[i].add(owner(reply))
            assert all(len(o) == 1 for o in owners)  # every call of a session on one instance
            assert len(set().union(*owners)) == 3  # new sessions spread over the replicas
            for p in proxies:
                await p.cleanup_auto_session()


async def test_sigkill_of_an_owner_loses_only_its_sessions(reg: str) -> None:
    async with (
        serve("examples/counter.py", "--registry", reg) as (a_proc, a),
        serve("examples/counter.py", "--registry", reg),
    ):
        async with mesh.connect(registry=reg) as client:
            await instances_of(client, "counter", 2)
            proxies = [client.proxy("session_counter", session_required=True) for _ in range(6)]
            replies = [await p(increment=1) for p in proxies]
            on_a = [p for p, r in zip(proxies, replies, strict=True) if owner(r) == a["instance"]]
            on_b = [p for p, r in zip(proxies, replies, strict=True) if owner(r) != a["instance"]]
            assert on_a and on_b
            os.kill(a_proc.pid, signal.SIGKILL)
            killed = time.monotonic()
            await eventually(
                lambda: a["instance"] not in {i.instance_id for i in client.instances()},
                what="the registry drops the killed instance",
            )
            seen_gone = time.monotonic() - killed
            for p in on_a:
                with pytest.raises(SessionLost):
                    await p(increment=1)
                with pytest.raises(SessionLost):  # and it stays lost: no fresh session
                    await p(increment=1)
            for p in on_b:
                assert (await p(increment=1))["count"] == 2  # untouched
            # Calls without a session fail over to the live replica.
            plain = client.proxy(
                "session_counter", session_required=True, retry_count=2, retry_delay=0.05
            )
            assert (await plain(increment=1))["count"] == 1
            print(f"consumer saw the SIGKILLed provider gone after {seen_gone * 1000:.0f} ms")


async def test_a_stream_whose_owner_is_killed_raises_session_lost(reg: str) -> None:
    async with serve("examples/counter.py", "--registry", reg) as (proc, _):
        async with mesh.connect(registry=reg) as client:
            await instances_of(client, "counter", 1)
            async with client.proxy("session_counter", session_required=True) as counter:
                await counter(increment=1)
                chunks = counter.options(buffer_size=2).call_tool_auto(
                    "stream_count", {"n": 1_000_000}
                )
                assert (await anext(chunks))["i"] == 1
                os.kill(proc.pid, signal.SIGKILL)
                with pytest.raises(SessionLost):  # as a unary call in the session would
                    async for _ in chunks:
                        pass
                with pytest.raises(SessionLost):
                    await counter(increment=1)


async def test_a_call_to_a_frozen_agent_fails_instead_of_waiting_forever() -> None:
    async with serve("examples/counter.py") as (proc, ready):
        async with mesh.connect(ready["address"]) as client:
            async with client.proxy("session_counter", session_required=True) as counter:
                assert (await counter(increment=1))["count"] == 1
                os.kill(proc.pid, signal.SIGSTOP)  # alive, connected, and silent
                try:
                    # No timeout of its own: keepalive (5 s pings, 5 s to answer) ends it.
                    with pytest.raises(AgentUnavailable):
                        await asyncio.wait_for(counter(increment=1), 60)
                finally:
                    os.kill(proc.pid, signal.SIGCONT)


def _state_of(client: mesh.MeshClient, instance_id: str) -> int | None:
    instance = client.instance(instance_id)
    return None if instance is None else instance.state


async def test_a_paused_owner_keeps_its_sessions(reg: str) -> None:
    async with serve("examples/counter.py", "--registry", reg) as (proc, ready):
        async with mesh.connect(registry=reg) as client:
            await instances_of(client, "counter", 1)
            async with client.proxy(
                "session_counter", session_required=True, retry_count=3
            ) as counter:
                assert (await counter(increment=1))["count"] == 1
                os.kill(proc.pid, signal.SIGSTOP)  # a GC pause, a VM steal
                try:
                    await eventually(
                        lambda: _state_of(client, ready["instance"]) == UNREACHABLE,
                        what="the registry marks the silent owner unreachable",
                    )
                    in_the_gap = asyncio.create_task(counter(increment=1))
                finally:
                    os.kill(proc.pid, signal.SIGCONT)
                assert (await in_the_gap)["count"] == 2  # it waited; nothing was lost
                await eventually(
                    lambda: _state_of(client, ready["instance"]) == SERVING,
                    what="the owner serves again",
                )
                assert (await counter(increment=1))["count"] == 3


async def test_an_owner_silent_past_the_bound_is_lost_and_drops_its_sessions() -> None:
    async with (
        registry(0, "--lost-after", "1.5") as (_, reg),
        serve("examples/counter.py", "--registry", reg) as (proc, ready),
        mesh.connect(registry=reg) as client,
    ):
        await instances_of(client, "counter", 1)
        counter = client.proxy("session_counter", session_required=True)
        assert (await counter(increment=1))["count"] == 1
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            await eventually(
                lambda: client.instance(ready["instance"]) is None,
                what="the registry removes the owner after --lost-after",
            )
            with pytest.raises(SessionOwnerLost):
                await counter(increment=1)
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        # Back, it learns it was declared lost: it drops the sessions its callers were told
        # are gone (no orphans) and registers again under the same instance id.
        await eventually(lambda: _none_open(ready["address"]), what="no orphaned session")
        await eventually(
            lambda: _state_of(client, ready["instance"]) == SERVING, what="it registers again"
        )
        with pytest.raises(SessionLost):  # and the lost session stays lost
            await counter(increment=1)


async def test_sigkill_of_a_consumer_mid_session_is_reclaimed_by_ttl(reg: str) -> None:
    async with (
        serve("examples/counter.py", "--registry", reg, "--session-ttl", "0.5") as (_, counter),
    ):
        async with serve("tests/agents/holder.py", "--registry", reg) as (holder_proc, _):
            async with mesh.connect(registry=reg) as client:
                await instances_of(client, "holder", 1)
                await instances_of(client, "counter", 1)
                hanging = asyncio.create_task(client.proxy("hold")())
                await eventually(
                    lambda: _some_open(counter["address"]),
                    what="the consumer opened a session downstream",
                )
                os.kill(holder_proc.pid, signal.SIGKILL)
                with pytest.raises(AgentUnavailable):
                    await hanging
                await eventually(
                    lambda: _none_open(counter["address"]),
                    within=10,
                    what="the provider reclaims the session",
                )


async def _some_open(address: str) -> bool:
    return await open_sessions(address) > 0


async def _none_open(address: str) -> bool:
    return await open_sessions(address) == 0


async def test_registry_restart_does_not_interrupt_open_sessions(
    free_tcp_port_factory: Callable[[], int],
) -> None:
    port = free_tcp_port_factory()  # the registry must come back on the same port
    reg = f"127.0.0.1:{port}"
    async with serve("examples/counter.py", "--registry", reg) as (_, counter):
        async with registry(port) as (reg_proc, _):
            async with mesh.connect(registry=reg) as client:
                await instances_of(client, "counter", 1)
                async with client.proxy("session_counter", session_required=True) as p:
                    assert (await p(increment=1))["count"] == 1
                    reg_proc.send_signal(signal.SIGKILL)
                    await exited(reg_proc)
                    assert (await p(increment=1))["count"] == 2  # the registry is down
                    async with registry(port):
                        await eventually(
                            lambda: client.watch.connected, within=10, what="the watch reconnects"
                        )
                        await instances_of(client, "counter", 1)  # the agent re-registered
                        assert (await p(increment=1))["count"] == 3
        assert await open_sessions(counter["address"]) == 0


async def test_draining_hands_open_sessions_to_another_replica(reg: str) -> None:
    async with (
        serve("examples/counter.py", "--registry", reg) as (a_proc, a),
        serve("examples/counter.py", "--registry", reg) as (_, b),
    ):
        async with mesh.connect(registry=reg) as client:
            await instances_of(client, "counter", 2)
            proxies = [client.proxy("session_counter", session_required=True) for _ in range(8)]
            first = [await p(increment=1) for p in proxies]
            on_a = [p for p, r in zip(proxies, first, strict=True) if owner(r) == a["instance"]]
            assert on_a
            a_proc.send_signal(signal.SIGTERM)
            # A hands its sessions to B and exits at once: no drain timeout to wait out.
            assert await exited(a_proc) == 0
            for p in proxies:  # every session carries on, state and all, on B
                assert (await p(increment=1))["count"] == 2
            assert await open_sessions(b["address"]) == len(proxies)
            fresh = client.proxy("session_counter", session_required=True)
            assert owner(await fresh(increment=1)) == b["instance"]
            for p in [*proxies, fresh]:
                await p.cleanup_auto_session()
            assert await open_sessions(b["address"]) == 0  # closed where they live now


async def test_draining_with_no_other_replica_keeps_its_sessions(reg: str) -> None:
    async with serve("examples/counter.py", "--registry", reg) as (a_proc, a):
        async with mesh.connect(registry=reg) as client:
            await instances_of(client, "counter", 1)
            proxies = [client.proxy("session_counter", session_required=True) for _ in range(2)]
            for p in proxies:
                await p(increment=1)
            a_proc.send_signal(signal.SIGTERM)
            await eventually(
                lambda: any(
                    i.instance_id == a["instance"] and i.state == 2 for i in client.instances()
                ),
                what="instance A marked draining",
            )
            for p in proxies:  # nowhere to go: open sessions keep working on A
                assert (await p(increment=1))["count"] == 2
            assert a_proc.returncode is None  # still waiting for its sessions
            for p in proxies:
                await p.cleanup_auto_session()
            assert await exited(a_proc) == 0  # once its sessions closed


async def test_a_call_at_the_wrong_instance_names_the_owner(reg: str) -> None:
    async with (
        serve("examples/counter.py", "--registry", reg) as (_, a),
        serve("examples/counter.py", "--registry", reg) as (_, b),
    ):
        async with mesh.connect(a["address"]) as at_a, mesh.connect(b["address"]) as at_b:
            sid = await at_a.proxy("session_counter").create_session()
            async with mesh.connect(registry=reg) as client:
                await instances_of(client, "counter", 2)
            await eventually(lambda: _elsewhere(at_b, sid), what="B knows of A")
            with pytest.raises(SessionElsewhere) as info:
                await at_b.proxy("session_counter").call_with_session(session_id=sid, increment=1)
            assert info.value.owner_endpoint == a["address"]
            with pytest.raises(SessionNotFound):  # a forged id, at its would-be owner
                await at_a.proxy("session_counter").call_with_session(
                    session_id=a["instance"] + ".forgedforgedforgedforg"
                )
            with pytest.raises(SessionNotFound):  # a forged id of no instance at all
                await at_b.proxy("session_counter").call_with_session(
                    session_id="00000000.forgedforgedforgedforg"
                )
        async with grpc.aio.insecure_channel(b["address"]) as channel:  # as grpcurl would
            stub = pb_grpc.SessionServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as raw:
                await stub.Call(
                    pb.CallRequest(tool="session_counter"), metadata=(("x-session-id", sid),)
                )
            assert raw.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert a["address"] in (raw.value.details() or "")


async def _elsewhere(client: mesh.AgentClient, sid: str) -> bool:
    try:
        await client.proxy("session_counter").call_with_session(session_id=sid, increment=0)
    except SessionElsewhere:
        return True
    except SessionNotFound:
        return False
    raise AssertionError("the call ran on the wrong instance")


async def test_providers_that_appear_or_vanish_rewire_the_next_invocation(reg: str) -> None:
    async with serve("tests/agents/holder.py", "--registry", reg):
        async with mesh.connect(registry=reg) as client:
            await instances_of(client, "holder", 1)
            count_twice = client.proxy("count_twice")
            assert await count_twice() is None  # no provider: injected as None
            async with serve("examples/counter.py", "--registry", reg):
                await eventually(lambda: _counts(count_twice), what="the provider is injected")
            await eventually(lambda: _is_none(count_twice), what="the vanished provider is gone")


async def _counts(proxy: mesh.Proxy) -> bool:
    reply = await proxy()
    return reply is not None and reply["count"] == 2


async def _is_none(proxy: mesh.Proxy) -> bool:
    try:
        return await proxy() is None
    except mesh.errors.ToolFailed as failed:
        # Killed but not yet dropped by the registry (a few ms): the call fails, not None.
        if failed.remote_type != "AgentUnavailable":
            raise
        return False


async def test_stateful_proxies_pin_calls_without_a_session(reg: str) -> None:
    agent = "tests/agents/replica.py"
    async with (
        serve(agent, "--registry", reg),
        serve(agent, "--registry", reg),
        serve(agent, "--registry", reg),
    ):
        async with mesh.connect(registry=reg) as client:
            await instances_of(client, "replica", 3)
            spread = client.proxy("whoami")
            assert len({await spread() for _ in range(6)}) == 3  # round robin
            pinned = client.proxy("whoami", stateful=True)
            assert len({await pinned() for _ in range(6)}) == 1  # one instance throughout
