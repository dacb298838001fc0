"""How fast a change in the mesh reaches its watchers: 200 instances registered, 50 clients
watching, the time from one more registration until every watcher lists it. Both backends:
the in-memory registry process, and a 3-member etcd cluster read directly.

    scripts/bench --registry
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.etcd, the cluster

from sessionmesh import mesh
from sessionmesh.v1 import registry_service_pb2 as rpb
from sessionmesh.v1 import registry_service_pb2_grpc as rpb_grpc
from sessionmesh.v1 import session_service_pb2 as pb
from sessionmesh.wire import etcd as layout
from tests.etcd import cluster

INSTANCES = 200
WATCHERS = 50
CHANGES = 20


def instance(n: int) -> rpb.Instance:
    return rpb.Instance(
        instance_id=f"bench{n:04d}",
        agent_name="bench",
        endpoint=f"127.0.0.1:{10000 + n}",
        tools=[pb.Tool(name="t", capability="t")],
        state=rpb.INSTANCE_STATE_SERVING,
    )


async def propagation(registry: str, add: Callable[[int], Awaitable[None]]) -> list[float]:
    for n in range(INSTANCES):
        await add(n)
    watchers = [mesh.connect(registry=registry) for _ in range(WATCHERS)]
    for w in watchers:
        await w.ready(within=30)
    try:
        await _all_see(watchers, INSTANCES)
        took: list[float] = []
        for n in range(INSTANCES, INSTANCES + CHANGES):
            started = time.perf_counter()
            await add(n)
            await _all_see(watchers, n + 1)
            took.append(time.perf_counter() - started)
        return took
    finally:
        for w in watchers:
            await w.aclose()


async def _all_see(watchers: list[mesh.MeshClient], n: int) -> None:
    deadline = time.perf_counter() + 30
    while any(len(w.instances()) < n for w in watchers):
        if time.perf_counter() > deadline:
            raise AssertionError(f"watchers did not see {n} instances within 30 s")
        await asyncio.sleep(0.001)


async def in_memory() -> list[float]:
    async with mesh.Registry() as registry:
        channel = grpc.aio.insecure_channel(registry.address)
        streams: list[grpc.aio.StreamStreamCall[rpb.RegisterRequest, rpb.RegisterResponse]] = []
        beats: list[asyncio.Task[None]] = []

        async def beat(
            call: grpc.aio.StreamStreamCall[rpb.RegisterRequest, rpb.RegisterResponse],
        ) -> None:
            while True:
                await asyncio.sleep(0.3)
                await call.write(rpb.RegisterRequest(heartbeat=rpb.Heartbeat()))

        async def add(n: int) -> None:
            call = rpb_grpc.RegistryServiceStub(channel).Register()
            await call.write(rpb.RegisterRequest(instance=instance(n)))
            await call.read()
            streams.append(call)
            beats.append(asyncio.get_running_loop().create_task(beat(call)))

        try:
            return await propagation(registry.address, add)
        finally:
            for task in beats:
                task.cancel()
            for call in streams:
                call.cancel()
            await channel.close()


async def on_etcd() -> list[float]:
    async with cluster() as etcd:
        target = layout.parse(etcd.url)
        assert target is not None
        api = layout.api()
        channel = grpc.aio.insecure_channel(target.grpc_target())
        kv = api.KVStub(channel)
        lease = int((await api.LeaseStub(channel).LeaseGrant(api.LeaseGrantRequest(TTL=60))).ID)

        async def add(n: int) -> None:
            one = instance(n)
            await kv.Put(
                api.PutRequest(
                    key=target.key(one.instance_id), value=one.SerializeToString(), lease=lease
                )
            )

        try:
            return await propagation(etcd.url, add)
        finally:
            await channel.close()


async def both() -> None:
    # One event loop for both: grpc.aio binds its completions to the loop of each call.
    for name, run in (("in-memory registry", in_memory), ("etcd (3 members)", on_etcd)):
        ms = sorted(t * 1000 for t in await run())
        print(f"  {name:<20} median {statistics.median(ms):6.1f} ms   worst {ms[-1]:6.1f} ms")


def main() -> None:
    print(
        f"a change reaching {WATCHERS} watchers, {INSTANCES} instances registered "
        f"({CHANGES} changes each)"
    )
    asyncio.run(both())


if __name__ == "__main__":
    main()
