"""The scale figures of scripts/bench: a call's cost with 100,000 idle sessions open, and
throughput with 1,024 sessions calling at once, each against raw grpc.aio in the same run."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from sessionmesh import mesh
from sessionmesh.v1 import session_service_pb2 as pb

#: Filled in by the serving process: the store of the agent the scale figures use.
STORE: list[Any] = []
_IDLE: list[str] = []


@mesh.tool
async def open_idle(n: int) -> int:
    """Open ``n`` sessions nobody calls (the bench's own hook into its agent's store)."""
    store = STORE[0]
    for _ in range(n):
        _IDLE.append(store.create().id)
    return len(store)


@mesh.tool
async def close_idle() -> int:
    store = STORE[0]
    while _IDLE:
        await store.close(_IDLE.pop())
    return len(store)


async def idle_flatness(
    agent: mesh.AgentClient,
    mesh_p50: Callable[[], Awaitable[float]],
    raw_p50: Callable[[], Awaitable[float]],
    idle: int,
    pairs: int,
) -> dict[str, Any]:
    """A session call's p50 ÷ raw unary p50 with ``idle`` sessions open, ÷ the same ratio
    with none, pair by pair (1.0 is flat): the i-th measurement with them against the
    i-th without, each side alternating which of mesh and raw goes first."""

    async def ratio(i: int) -> float:
        if i % 2:
            raw = await raw_p50()
            return await mesh_p50() / raw
        return await mesh_p50() / await raw_p50()

    before = [await ratio(i) for i in range(pairs)]
    await agent.proxy("open_idle", timeout=600)(n=idle)
    try:
        after = [await ratio(i) for i in range(pairs)]
    finally:
        await agent.proxy("close_idle", timeout=600)()
    return {
        "idle_sessions_flatness": [a / b for a, b in zip(after, before, strict=True)],
        "idle_sessions_open": idle,
    }


async def wide(
    agent: mesh.AgentClient, raw_call: Callable[[], Awaitable[Any]], sessions: int, per: int
) -> dict[str, Any]:
    """Calls/s with ``sessions`` auto sessions calling in a loop, and raw grpc.aio with as
    many unary calls in flight on one channel (or how it failed)."""
    proxies = [agent.proxy("bump", session_required=True, timeout=60) for _ in range(sessions)]

    async def loop(proxy: mesh.Proxy) -> None:
        for _ in range(per):
            await proxy(increment=1)

    await asyncio.gather(*(p(increment=1) for p in proxies))  # open them: not timed
    t0 = time.perf_counter()
    await asyncio.gather(*(loop(p) for p in proxies))
    mesh_rate = sessions * per / (time.perf_counter() - t0)
    for proxy in proxies:
        await proxy.cleanup_auto_session()

    async def raw_loop() -> None:
        for _ in range(per):
            await raw_call()

    raw: float | str
    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(raw_loop() for _ in range(sessions)))
        raw = sessions * per / (time.perf_counter() - t0)
    except grpc.aio.AioRpcError as exc:
        raw = f"failed: {exc.code().name}"
    return {"wide_sessions": sessions, "wide_mesh_calls_s": mesh_rate, "wide_raw": raw}


def raw_unary(stub: Any) -> Callable[[], Awaitable[pb.CallResponse]]:
    request = pb.CallRequest(tool="bump")
    request.arguments.update({"increment": 1})
    metadata = (("x-session-id", "raw-session"),)
    return lambda: stub.Call(request, metadata=metadata)
