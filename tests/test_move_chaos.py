"""Sessions moving under load, as processes: clients call in hundreds of sessions while
sessions are moved at random between replicas and replicas are replaced one by one (SIGTERM,
a rolling deploy). Every count must equal the increments acknowledged to its caller: nothing
failed, lost or doubled. On the registry, and on etcd with each replica on its own loopback
"host" (moving across hosts). Bounded: a few seconds of load each."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
from typing import Any

import pytest

from sessionmesh import mesh
from sessionmesh.testing import eventually
from sessionmesh.v1 import registry_service_pb2 as rpb
from tests.etcd import cluster
from tests.procs import exited, open_sessions, serve

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

SESSIONS = 300
#: Seconds of calls between two disruptions.
SPELL = 0.6


class Caller:
    """One session, called in a loop; what it was told is what it must find."""

    def __init__(self, client: mesh.MeshClient) -> None:
        self.proxy = client.proxy("session_counter", session_required=True)
        self.acknowledged = 0
        self.calls = 0

    async def run(self, stop: asyncio.Event, rng: random.Random) -> None:
        while not stop.is_set():
            step = rng.randint(1, 3)
            reply = await self.proxy(increment=step)  # any failure fails the test
            self.acknowledged += step
            self.calls += 1
            assert reply["count"] == self.acknowledged, "a call was lost or applied twice"


async def _replica(stack: contextlib.AsyncExitStack, *args: str) -> tuple[Any, dict[str, Any]]:
    return await stack.enter_async_context(serve("examples/counter.py", *args))


def _serving(client: mesh.MeshClient) -> list[rpb.Instance]:
    return [
        i
        for i in client.instances()
        if i.agent_name == "counter" and i.state == rpb.INSTANCE_STATE_SERVING
    ]


async def _chaos(client: mesh.MeshClient, start_replica: Any, replicas: list[Any]) -> None:
    rng = random.Random(24)
    await eventually(lambda: len(_serving(client)) == len(replicas), what="replicas listed")
    callers = [Caller(client) for _ in range(SESSIONS)]
    stop = asyncio.Event()
    load = [asyncio.create_task(c.run(stop, rng)) for c in callers]
    try:
        for round_ in range(4):
            await asyncio.sleep(SPELL)  # load runs meanwhile
            # Rebalance at random: some sessions to a random replica.
            target = rng.choice(_serving(client))
            moved = await client.move_sessions(
                "counter", target.instance_id, count=rng.randint(10, 60)
            )
            assert not moved.stayed
            await asyncio.sleep(SPELL)
            if round_ % 2 == 0:
                # A rolling deploy step: a new replica, then the oldest one is stopped.
                replicas.append(await start_replica())
                await eventually(
                    lambda: len(_serving(client)) == len(replicas), what="the new replica"
                )
                proc, _ = replicas.pop(0)
                proc.send_signal(signal.SIGTERM)
                assert await exited(proc) == 0
        await asyncio.sleep(SPELL)
    finally:
        stop.set()
        await asyncio.gather(*load)  # re-raises the first failure
    assert sum(c.calls for c in callers) > SESSIONS  # it did run under load
    for c in callers:  # each session, read once more wherever it lives now
        assert (await c.proxy(increment=0))["count"] == c.acknowledged
        await c.proxy.cleanup_auto_session()
    for _, ready in replicas:
        assert await open_sessions(ready["address"]) == 0  # closed where they lived


async def test_moves_and_a_rolling_deploy_under_load_lose_and_double_nothing(reg: str) -> None:
    async with contextlib.AsyncExitStack() as stack:
        replicas = [await _replica(stack, "--registry", reg) for _ in range(3)]
        client = await stack.enter_async_context(mesh.connect(registry=reg))
        await _chaos(client, lambda: _replica(stack, "--registry", reg), replicas)


async def test_sessions_move_across_hosts_on_etcd() -> None:
    hosts = iter(range(2, 20))

    async with contextlib.AsyncExitStack() as stack:
        etcd = await stack.enter_async_context(cluster())

        def start() -> Any:
            host = f"127.0.0.{next(hosts)}"
            return _replica(stack, "--host", host, "--registry", etcd.url, "--lost-after", "2")

        replicas = [await start() for _ in range(3)]
        client = await stack.enter_async_context(mesh.connect(registry=etcd.url))
        await _chaos(client, start, replicas)
