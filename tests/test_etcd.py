"""The mesh on a real 3-member etcd cluster, no registry process: agents in real processes on
distinct loopback "hosts" (127.0.0.2, .3, .4), each binding and advertising its own address."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from typing import Any

import pytest

from sessionmesh import mesh
from sessionmesh.errors import SessionLost, UsageError
from sessionmesh.testing import eventually
from tests.etcd import Cluster, cluster
from tests.procs import CLI, ROOT, open_sessions, process, registry, serve

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

LEASE = "2"  # seconds: what a SIGKILLed agent's key outlives it by, at most


def owner(reply: dict[str, Any]) -> str:
    return str(reply["session"]).partition(".")[0]


async def listed(client: mesh.MeshClient, agent: str, n: int, within: float = 10) -> list[str]:
    await eventually(
        lambda: len([i for i in client.instances() if i.agent_name == agent]) == n,
        what=f"{n} {agent} instance(s) in etcd",
        within=within,
    )
    return [i.instance_id for i in client.instances() if i.agent_name == agent]


def on_host(n: int, etcd: Cluster, *more: str) -> tuple[str, ...]:
    return ("--host", f"127.0.0.{n}", "--registry", etcd.url, "--lost-after", LEASE, *more)


async def test_the_design_notes_flows_and_affinity_across_three_hosts() -> None:
    async with (
        cluster() as etcd,
        serve("examples/counter.py", *on_host(2, etcd)) as (_, a),
        serve("examples/counter.py", *on_host(3, etcd)) as (_, b),
        serve("examples/counter.py", *on_host(4, etcd)) as (_, c),
        serve("examples/consumer.py", *on_host(5, etcd)),
        mesh.connect(registry=etcd.url) as client,
    ):
        assert [x["address"].partition(":")[0] for x in (a, b, c)] == [
            "127.0.0.2",
            "127.0.0.3",
            "127.0.0.4",
        ]
        await listed(client, "counter", 3)
        await listed(client, "consumer", 1)
        endpoints = {i.endpoint for i in client.instances() if i.agent_name == "counter"}
        assert endpoints == {a["address"], b["address"], c["address"]}
        auto = await client.proxy("auto_session_test")(test_rounds=3)
        assert [r["response"]["count"] for r in auto["results"]] == [1, 3, 6]
        manual = await client.proxy("session_test")(test_rounds=3)
        assert [r["response"]["count"] for r in manual["results"]] == [1, 3, 6]
        assert (await client.proxy("reliable_counter")(amount=5))["count"] == 5
        streamed = [c async for c in client.proxy("streaming_session_service").stream()]
        assert [c["i"] for c in streamed] == [1, 2, 3]
        proxies = [client.proxy("session_counter", session_required=True) for _ in range(12)]
        owners: list[set[str]] = [set() for _ in proxies]
        for round_ in (1, 2, 3):
            for i, reply in enumerate(await asyncio.gather(*(p(increment=1) for p in proxies))):
                assert reply["count"] == round_  # same instance every time: its state
                owners[i].add(owner(reply))
        assert all(len(o) == 1 for o in owners)
        assert len(set().union(*owners)) == 3  # spread over the three hosts
        for p in proxies:
            await p.cleanup_auto_session()
        for x in (a, b, c):
            assert await open_sessions(x["address"]) == 0


async def test_sigkill_of_the_etcd_leader_mid_run_loses_nothing() -> None:
    async with (
        cluster() as etcd,
        serve("examples/counter.py", *on_host(2, etcd)),
        mesh.connect(registry=etcd.url) as client,
    ):
        await listed(client, "counter", 1)
        async with client.proxy("session_counter", session_required=True) as counter:
            count = 0
            stop = asyncio.Event()

            async def keep_calling() -> None:
                nonlocal count
                while not stop.is_set():
                    count += 1
                    assert (await counter(increment=1))["count"] == count  # none lost, none twice

            calls = asyncio.create_task(keep_calling())
            await eventually(lambda: count >= 20, what="calls flowing")
            leader = await etcd.leader()
            await etcd.kill(leader)
            at_kill = count
            new_leader = await etcd.leader()
            assert new_leader != leader
            # A new agent registers with the new leader and is seen by the watchers.
            async with serve("examples/counter.py", *on_host(3, etcd)):
                await listed(client, "counter", 2)
            await eventually(lambda: count >= at_kill + 20, what="calls still flowing")
            stop.set()
            await calls  # not one call failed throughout


async def test_sigkill_of_a_provider_loses_its_sessions_within_the_lease() -> None:
    async with (
        cluster() as etcd,
        serve("examples/counter.py", *on_host(2, etcd)) as (a_proc, a),
        serve("examples/counter.py", *on_host(3, etcd)),
        mesh.connect(registry=etcd.url) as client,
    ):
        await listed(client, "counter", 2)
        proxies = [client.proxy("session_counter", session_required=True) for _ in range(6)]
        replies = [await p(increment=1) for p in proxies]
        on_a = [p for p, r in zip(proxies, replies, strict=True) if owner(r) == a["instance"]]
        on_b = [p for p, r in zip(proxies, replies, strict=True) if owner(r) != a["instance"]]
        assert on_a and on_b
        os.kill(a_proc.pid, signal.SIGKILL)
        # Its key goes with its lease (2 s; etcd may take a little more to expire it).
        await eventually(
            lambda: a["instance"] not in {i.instance_id for i in client.instances()},
            what="the killed instance leaves etcd",
            within=10,
        )
        for p in on_a:
            with pytest.raises(SessionLost):
                await p(increment=1)
        for p in on_b:
            assert (await p(increment=1))["count"] == 2  # untouched
        for p in proxies:
            await p.cleanup_auto_session()


async def test_all_of_etcd_down_then_back() -> None:
    async with (
        cluster() as etcd,
        serve("examples/counter.py", *on_host(2, etcd)),
        mesh.connect(registry=etcd.url) as client,
    ):
        await listed(client, "counter", 1)
        async with client.proxy("session_counter", session_required=True) as counter:
            assert (await counter(increment=1))["count"] == 1
            for name in list(etcd.procs):
                await etcd.kill(name)
            # etcd is gone for longer than the agents' leases: nothing changes for a caller.
            deadline = asyncio.get_running_loop().time() + 10  # the 10 s outage
            n = 1
            while asyncio.get_running_loop().time() < deadline:
                n += 1
                assert (await counter(increment=1))["count"] == n
                await asyncio.sleep(0.1)  # pacing the calls, not synchronizing
            assert len(client.instances()) == 1  # the last view is kept
            new = client.proxy("session_counter", session_required=True)
            assert (await new(increment=5))["count"] == 5  # a new session, from that view
            await new.cleanup_auto_session()
            for name in etcd.names:
                await etcd.start(name, new=False)
            await etcd.leader()
            # Back: the agent's lease lives on (etcd renews leases on a new leader), and a
            # new agent registers and is seen.
            async with serve("examples/counter.py", *on_host(3, etcd)):
                await listed(client, "counter", 2)
            assert (await counter(increment=1))["count"] == n + 1


def test_etcd_addresses_are_checked_up_front() -> None:
    with pytest.raises(UsageError, match="HOST:PORT"):
        mesh.connect(registry="etcd://nowhere")
    with pytest.raises(UsageError, match="as IP addresses"):
        mesh.connect(registry="etcd://a.example:2379,b.example:2379")
    with pytest.raises(UsageError, match="--lost-after"):
        mesh.Agent([], registry="127.0.0.1:1", lost_after=3)


async def test_run_and_the_cli_on_etcd() -> None:
    async with cluster() as etcd:
        files = [str(ROOT / "examples/counter.py"), str(ROOT / "examples/consumer.py")]
        args = ["--registry", etcd.url, "--host", "127.0.0.6", "--lost-after", LEASE]
        async with process("run", *files, *args) as (_, ready):
            assert {a["address"].partition(":")[0] for a in ready["agents"]} == {"127.0.0.6"}

            def cli(*command: str) -> subprocess.CompletedProcess[str]:
                return subprocess.run(
                    [*CLI, *command, "--registry", etcd.url],
                    capture_output=True,
                    text=True,
                    timeout=60,
                )

            listed = await asyncio.to_thread(cli, "list", "--json")
            assert listed.returncode == 0, listed.stderr
            rows = json.loads(listed.stdout)
            assert sorted(r["agent"] for r in rows) == ["consumer", "counter"]
            called = await asyncio.to_thread(cli, "call", "auto_session_test", '{"test_rounds": 2}')
            assert called.returncode == 0, called.stderr
            assert [r["response"]["count"] for r in json.loads(called.stdout)["results"]] == [1, 3]


async def test_several_registries_backed_by_etcd_serve_one_mesh() -> None:
    async with (
        cluster() as etcd,
        registry(0, "--store", etcd.url, "--lost-after", LEASE) as (_, first),
        registry(0, "--store", etcd.url, "--lost-after", LEASE) as (_, second),
    ):
        async with (
            serve("examples/counter.py", "--host", "127.0.0.2", "--registry", first),
            serve("examples/counter.py", "--host", "127.0.0.3", "--registry", second) as (b, _),
            mesh.connect(registry=first) as via_first,
            mesh.connect(registry=second) as via_second,
            mesh.connect(registry=etcd.url) as direct,
        ):
            for client in (via_first, via_second, direct):
                await listed(client, "counter", 2)
            proxies = [via_first.proxy("session_counter", session_required=True) for _ in range(6)]
            replies = [await p(increment=1) for p in proxies]
            assert len({owner(r) for r in replies}) == 2  # both hosts, whoever registered them
            for p in proxies:
                await p.cleanup_auto_session()
            b.send_signal(signal.SIGTERM)  # deregisters through the second registry ...
            await listed(via_first, "counter", 1)  # ... and the first one hears of it


async def test_a_pause_shorter_than_the_lease_costs_nothing_a_longer_one_its_sessions() -> None:
    async with (
        cluster() as etcd,
        serve("examples/counter.py", *on_host(2, etcd)) as (proc, a),
        mesh.connect(registry=etcd.url) as client,
    ):
        await listed(client, "counter", 1)
        async with client.proxy("session_counter", session_required=True) as counter:
            assert (await counter(increment=1))["count"] == 1
            proc.send_signal(signal.SIGSTOP)  # under the 2 s lease
            await asyncio.sleep(1.0)  # the pause itself is what is tested, not a wait
            proc.send_signal(signal.SIGCONT)
            assert (await counter(increment=1))["count"] == 2
            proc.send_signal(signal.SIGSTOP)  # well over the lease
            await eventually(
                lambda: a["instance"] not in {i.instance_id for i in client.instances()},
                what="the paused instance's lease expires",
                within=15,
            )
            proc.send_signal(signal.SIGCONT)
            with pytest.raises(SessionLost):
                await counter(increment=1)
        # Back, it closed the sessions its callers were told are lost, and registered anew
        # (it first waits out its lost lease's keepalive: slow on a busy machine, 10 s was
        # too tight beside a CPU hog in 2 of 4 runs).
        await listed(client, "counter", 1, within=30)

        async def no_orphans() -> bool:
            return await open_sessions(a["address"]) == 0

        await eventually(no_orphans, what="no orphan session left", within=10)
