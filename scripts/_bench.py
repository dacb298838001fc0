"""scripts/bench: sessionmesh against raw grpc.aio, measured side by side in one run.

The servers (a raw grpc.aio SessionService doing the same work, and a sessionmesh agent) run
in a child process, the clients here: two cores, one each. Every loop is bounded by a count.
Figures are ratios against the raw baseline of the same run; absolute times drift.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
from _bench_durable import env_with, redis_server, store_of_env, takeover_ms
from _bench_scale import STORE as SCALE_STORE
from _bench_scale import close_idle, idle_flatness, open_idle, raw_unary, wide
from _bench_tool import ARGS, bump
from google.protobuf import json_format

from sessionmesh import mesh
from sessionmesh.server._sessions import SessionStore
from sessionmesh.testing import eventually
from sessionmesh.v1 import session_service_pb2 as pb
from sessionmesh.v1 import session_service_pb2_grpc as pb_grpc
from sessionmesh.wire.codec import from_struct, from_value, set_struct, set_value

# -- the servers (child process) ------------------------------------------------------------


@mesh.tool
async def plain(increment: int = 1, note: str = "", flag: bool = False) -> int:
    return increment


@mesh.tool
async def take(items: list[dict[str, Any]], increment: int = 1) -> int:
    """A large call: its argument is decoded, the answer is small."""
    return len(items) + increment


def payload(size: int) -> dict[str, Any]:
    """Arguments of about ``size`` bytes, encoded: a list of small objects, as a batch of
    records is (the costly shape: every object is a Struct to build and to read)."""
    item = {"id": 123456, "name": "item-name-0001", "price": 12.5, "tags": ["a", "b"]}
    per = 80  # bytes per encoded item, about
    return {"items": [dict(item) for _ in range(size // per)], "increment": 1}


@mesh.tool
async def push(n: int) -> AsyncIterator[int]:
    for i in range(n):
        yield i


@mesh.tool(dependencies=["bump"], session_required=True)
async def consume(rounds: int, bump: mesh.McpAgent | None = None) -> list[float]:
    """Times `rounds` injected-proxy calls from inside a consumer tool (ns per call)."""
    assert bump is not None
    await bump(**ARGS)  # opens the auto session: not part of the figure
    times: list[float] = []
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        await bump(**ARGS)
        times.append(time.perf_counter_ns() - t0)
    return times


#: Makes the raw server's Exchange the bare contract round trip instead of the echo.
CONTRACT_KEY = "x-bench-contract"


class RawService(pb_grpc.SessionServiceServicer):
    """The baseline: plain grpc.aio doing the same work (decode, count, answer), no mesh."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    async def Call(
        self, request: pb.CallRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CallResponse:
        key = request.tool
        if key == "take":  # a large call: read it all, as plain grpc.aio code would
            arguments = json_format.MessageToDict(request.arguments)
            response = pb.CallResponse()
            response.result.number_value = len(arguments["items"]) + arguments["increment"]
            return response
        count = self.counts.get(key, 0) + int(request.arguments.fields["increment"].number_value)
        self.counts[key] = count
        response = pb.CallResponse()
        response.result.number_value = count
        return response

    async def Exchange(  # type: ignore[override]
        self,
        request_iterator: AsyncIterator[pb.ExchangeRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        """The floor: one message each way on an open bidi stream, nothing else. With
        ``x-bench-contract: 1`` the bare contract round trip: the same, plus the Struct work
        of a session call (decode the arguments, call a counter, encode the result)."""
        headers = dict(context.invocation_metadata() or ())
        if headers.get(CONTRACT_KEY) == "1":
            count = 0
            async for request in request_iterator:
                arguments = from_struct(request.call.arguments)
                count += arguments["increment"]
                answer = pb.ExchangeResponse(id=request.id)
                set_value(answer.result, count)
                await context.write(answer)
            return
        async for request in request_iterator:
            answer = pb.ExchangeResponse(id=request.id)
            answer.result.number_value = 1
            await context.write(answer)

    async def StreamCall(  # type: ignore[override]
        self,
        request_iterator: AsyncIterator[pb.StreamCallRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        first = await anext(aiter(request_iterator))
        n = int(first.start.call.arguments.fields["n"].number_value)
        for i in range(n):
            message = pb.StreamCallResponse()
            message.chunk.number_value = i
            await context.write(message)


def tcp_echo_server() -> int:
    """A blocking TCP echo server in a thread: the floor below any RPC."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve_one() -> None:
        while True:
            conn, _ = listener.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with conn:
                while data := conn.recv(64):
                    conn.sendall(data)

    threading.Thread(target=serve_one, daemon=True).start()
    return int(listener.getsockname()[1])


def throwaway_pki(root: Path) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1 and a client one: their files."""
    import trustme  # a dev dependency, as the bench is a dev tool

    ca = trustme.CA()
    files = {"ca": str(root / "ca.pem")}
    ca.cert_pem.write_to_path(files["ca"])
    for who, identity in (("server", "127.0.0.1"), ("client", "bench.example.org")):
        issued = ca.issue_cert(identity)
        files[f"{who}_cert"] = str(root / f"{who}.pem")
        files[f"{who}_key"] = str(root / f"{who}.key")
        issued.cert_chain_pems[0].write_to_path(files[f"{who}_cert"])
        issued.private_key_pem.write_to_path(files[f"{who}_key"])
    return files


async def paired(
    pairs: int, sides: dict[str, Callable[[], Awaitable[float]]]
) -> list[dict[str, float]]:
    """Each side's figure, pair by pair, the order alternating so drift hits every side."""
    names = list(sides)
    took: list[dict[str, float]] = []
    for i in range(pairs):
        took.append({name: await sides[name]() for name in (names if i % 2 == 0 else names[::-1])})
    return took


async def call_p50(proxy: mesh.Proxy, n: int) -> float:
    return pct(await timed(functools.partial(proxy, **ARGS), n), 0.5)


async def until_sigterm() -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()


async def scale(addresses: dict[str, str], quick: bool, n: int) -> dict[str, Any]:
    """100,000 idle sessions (10,000 in --quick) and 1,024 sessions at once."""
    async with (
        mesh.connect(addresses["agent"]) as agent,
        grpc.aio.insecure_channel(addresses["raw"]) as raw_channel,
    ):
        raw_call = raw_unary(pb_grpc.SessionServiceStub(raw_channel))
        async with agent.proxy("bump", session_required=True) as counter:
            await counter(**ARGS)
            out = await idle_flatness(
                agent,
                functools.partial(call_p50, counter, n),
                functools.partial(_p50, raw_call, n),
                10_000 if quick else 100_000,
                3 if quick else 5,
            )
            out["idle_sessions_flatness"] = spread(out["idle_sessions_flatness"])
        out.update(await wide(agent, raw_call, 1024, 3 if quick else 10))
    return out


async def large_vs_unary(
    addresses: dict[str, str], pairs: int, n: int, quick: bool
) -> dict[str, Any]:
    """A call with a large argument (no session) vs a raw unary Call of the same bytes, built
    from the same Python values (Struct.update) and read whole on the server
    (json_format.MessageToDict): the same work, done the plain grpc.aio way. The 2 MB
    figure (a second or more a pair) is left to the full run."""
    out: dict[str, Any] = {}
    async with (
        mesh.connect(addresses["agent"]) as agent,
        grpc.aio.insecure_channel(
            addresses["raw"], options=[("grpc.max_receive_message_length", 64 << 20)]
        ) as raw_channel,
    ):
        raw_stub = pb_grpc.SessionServiceStub(raw_channel)
        take_ = agent.proxy("take")
        sizes = (("200KB", 200_000),) if quick else (("200KB", 200_000), ("2MB", 2_000_000))
        for label, size in sizes:
            args = payload(size)
            # Tens of ms a call at 200 KB, hundreds at 2 MB: few calls, or the bench drags.
            count = max(5, n // (25 if size < 1_000_000 else 200))

            async def mesh_call(args: dict[str, Any] = args) -> Any:
                return await take_(**args)

            async def raw_call(args: dict[str, Any] = args) -> Any:
                request = pb.CallRequest(tool="take")
                request.arguments.update(args)  # from the same Python values, each call
                return await raw_stub.Call(request)

            took = await paired(
                pairs,
                {
                    "mesh": functools.partial(_p50, mesh_call, count, 2),
                    "raw": functools.partial(_p50, raw_call, count, 2),
                },
            )
            out[f"large_{label}_vs_unary"] = spread([t["mesh"] / t["raw"] for t in took])
            sized = pb.CallRequest(tool="take")
            sized.arguments.update(args)
            out[f"large_{label}_bytes"] = sized.ByteSize()
    return out


async def _p50(call: Callable[[], Awaitable[Any]], n: int, warm: int = 200) -> float:
    return pct(await timed(call, n, warm), 0.5)


async def session_call_vs(
    this: mesh.AgentClient, that: mesh.AgentClient, pairs: int, n: int
) -> list[dict[str, float]]:
    """A session call's p50 on ``this`` agent and on ``that`` one, pair by pair."""
    async with (
        this.proxy("bump", session_required=True) as one,
        that.proxy("bump", session_required=True) as other,
    ):
        await one(**ARGS)
        await other(**ARGS)
        return await paired(
            pairs, {"this": lambda: call_p50(one, n), "that": lambda: call_p50(other, n)}
        )


async def durable_vs_memory(addresses: dict[str, str], pairs: int, n: int) -> dict[str, Any]:
    """A call in a durable session (saved to Redis before it is answered) vs the same call
    in an in-memory session, alternating."""
    async with (
        mesh.connect(addresses["durable_agent"]) as durable,
        mesh.connect(addresses["agent"]) as memory,
    ):
        took = await session_call_vs(durable, memory, pairs, n)
    return {
        "durable_vs_memory_p50": spread([t["this"] / t["that"] for t in took]),
        "durable_call_p50_us": took[-1]["this"],
    }


async def mtls_vs_plaintext(addresses: dict[str, str], pairs: int, n: int) -> dict[str, Any]:
    """A session call over mutual TLS vs the same over plaintext, once connected."""
    tls = mesh.TLS(cert=addresses["client_cert"], key=addresses["client_key"], ca=addresses["ca"])
    async with (
        mesh.connect(addresses["mtls_agent"], tls=tls) as secure,
        mesh.connect(addresses["agent"]) as plain,
    ):
        took = await session_call_vs(secure, plain, pairs, n)
    return {
        "mtls_vs_plaintext_p50": spread([t["this"] / t["that"] for t in took]),
        "mtls_call_p50_us": took[-1]["this"],
    }


def sdk_provider() -> Any:
    """An OpenTelemetry SDK that records every span and exports it, in batches, to an
    exporter that keeps nothing: the cost of tracing without a collector's."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    class Discard(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Discard()))
    return provider


async def traced_vs_not(addresses: dict[str, str], pairs: int, n: int) -> dict[str, Any]:
    """A session call traced on both sides (the caller here, and an agent whose process
    traces: SDK recording, batch export) vs the same untraced, alternating."""
    from sessionmesh import tracing

    provider = sdk_provider()
    async with (
        mesh.connect(addresses["agent"]) as plain_agent,
        mesh.connect(addresses["traced_agent"]) as traced_agent,
    ):
        async with (
            plain_agent.proxy("bump", session_required=True) as plain,
            traced_agent.proxy("bump", session_required=True) as traced,
        ):
            await plain(**ARGS)
            await traced(**ARGS)

            async def traced_p50() -> float:
                tracing.enable(provider)
                try:
                    return await call_p50(traced, n)
                finally:
                    tracing.disable()

            took = await paired(pairs, {"on": traced_p50, "off": lambda: call_p50(plain, n)})
    return {"traced_vs_not_p50": spread([t["on"] / t["off"] for t in took])}


async def serve_traced() -> None:
    """A second serving process whose agent traces every call."""
    from sessionmesh import tracing

    tracing.enable(sdk_provider())
    agent = mesh.Agent([bump], name="bench-traced")
    await agent.start()
    print(json.dumps({"traced_agent": agent.address}), flush=True)
    await until_sigterm()
    await agent.stop(0)


async def serve() -> None:
    raw = grpc.aio.server()
    # Only Call, Exchange and StreamCall are measured; the rest stay unimplemented.
    pb_grpc.add_SessionServiceServicer_to_server(RawService(), raw)  # type: ignore[abstract]
    raw_port = raw.add_insecure_port("127.0.0.1:0")
    await raw.start()
    provider = mesh.Agent(
        [bump, plain, push, take, open_idle, close_idle],
        name="bench-provider",
        max_sessions=1_000_000,  # the scale figures open 100,000 idle ones
    )
    await provider.start()
    SCALE_STORE.append(provider.sessions)
    consumer = mesh.Agent([consume], name="bench-consumer", peers={"bump": provider.address})
    await consumer.start()
    certificates = tempfile.TemporaryDirectory()
    tls = throwaway_pki(Path(certificates.name))
    secure = mesh.Agent(
        [bump],
        name="bench-mtls",
        tls=mesh.TLS(
            cert=tls["server_cert"], key=tls["server_key"], ca=tls["ca"], client_ca=tls["ca"]
        ),
    )
    await secure.start()
    store = store_of_env()
    durable = mesh.Agent([bump], name="bench-durable", session_store=store) if store else None
    if durable is not None:
        await durable.start()
    print(
        json.dumps(
            {
                "raw": f"127.0.0.1:{raw_port}",
                "tcp": f"127.0.0.1:{tcp_echo_server()}",
                "agent": provider.address,
                "consumer": consumer.address,
                "mtls_agent": secure.address,
                **({"durable_agent": durable.address} if durable is not None else {}),
                **tls,
            }
        ),
        flush=True,
    )
    await until_sigterm()
    if durable is not None:
        await durable.stop(0)
    await secure.stop(0)
    certificates.cleanup()
    await consumer.stop(0)
    await provider.stop(0)
    await raw.stop(0)


# -- measuring (this process) ---------------------------------------------------------------


def _caller(proxies: list[mesh.Proxy], i: int) -> Callable[[], Awaitable[Any]]:
    return lambda: proxies[i](**ARGS)


def pct(samples: list[int], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000.0  # µs


async def timed(call: Callable[[], Awaitable[Any]], n: int, warm: int = 200) -> list[int]:
    for _ in range(min(warm, n)):
        await call()
    out = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        await call()
        out.append(time.perf_counter_ns() - t0)
    return out


async def throughput(
    make: Callable[[int], Callable[[], Awaitable[Any]]], workers: int, per_worker: int
) -> float:
    calls = [make(i) for i in range(workers)]

    async def worker(call: Callable[[], Awaitable[Any]]) -> None:
        for _ in range(per_worker):
            await call()

    await asyncio.gather(*(worker(c) for c in calls[:workers]))  # warm up
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in calls))
    return workers * per_worker / (time.perf_counter() - t0)


def idle_session_bytes(count: int) -> float:
    """Bytes the agent holds per idle session (its store, measured with tracemalloc)."""

    async def run() -> float:
        store = SessionStore("bench0001", default_ttl=300, max_sessions=count + 1)
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(count):
            store.create()
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        return (after - before) / count

    import logging

    logging.getLogger("sessionmesh.session").setLevel(logging.WARNING)
    return asyncio.run(run())


def spread(ratios: list[float]) -> dict[str, float]:
    """A ratio as the median of its pairs, with the pairs' min and max."""
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def tcp_pingpong_p50(address: str, n: int) -> float:
    """p50 µs of 40-byte round trips on a plain blocking socket (run in a thread)."""
    host, _, port = address.rpartition(":")
    payload = b"x" * 40
    with socket.create_connection((host, int(port))) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        samples = []
        for i in range(n + 200):
            t0 = time.perf_counter_ns()
            conn.sendall(payload)
            got = 0
            while got < len(payload):
                got += len(conn.recv(64))
            if i >= 200:
                samples.append(time.perf_counter_ns() - t0)
    return pct(samples, 0.5)


async def measure(addresses: dict[str, str], quick: bool) -> dict[str, Any]:
    """Every figure is a ratio measured as alternating A/B pairs; it is reported as the
    median of the pairs with their spread (min-max). A single pair swings from 0.6x to 1.3x
    on two shared cores; only the median of several means anything."""
    pairs = 3 if quick else 7
    n = 500 if quick else 1500
    raw_channel = grpc.aio.insecure_channel(addresses["raw"])
    raw_stub = pb_grpc.SessionServiceStub(raw_channel)
    request = pb.CallRequest(tool="bump")
    request.arguments.update(ARGS)
    raw_md = (("x-session-id", "raw-session"),)
    echo = raw_stub.Exchange()
    echo_message = pb.ExchangeRequest(id=1, call=request)

    async def raw_call() -> Any:
        return await raw_stub.Call(request, metadata=raw_md)

    async def echo_call() -> Any:
        await echo.write(echo_message)
        return await echo.read()

    contract = raw_stub.Exchange(metadata=((CONTRACT_KEY, "1"),))

    async def contract_call() -> Any:
        # What a session call's contract costs with no session code: the Struct built
        # per call, decoded and answered by the server, the answer decoded here.
        message = pb.ExchangeRequest(id=1)
        message.call.tool = "bump"
        set_struct(message.call.arguments, ARGS)
        await contract.write(message)
        answer = await contract.read()
        assert isinstance(answer, pb.ExchangeResponse)
        return from_value(answer.result)

    results: dict[str, Any] = {}
    async with mesh.connect(addresses["agent"]) as agent:
        p50_unary: list[float] = []
        p99_unary: list[float] = []
        p50_echo: list[float] = []
        p50_contract: list[float] = []
        contract_echo: list[float] = []
        p50_tcp: list[float] = []
        first_vs_plain: list[float] = []
        async with agent.proxy("bump", session_required=True) as counter:
            await counter(**ARGS)

            async def mesh_call() -> Any:
                return await counter(**ARGS)

            for i in range(pairs):  # alternating order, so drift hits every side alike
                sides = [
                    ("raw", raw_call),
                    ("echo", echo_call),
                    ("contract", contract_call),
                    ("mesh", mesh_call),
                ]
                timed_sides = {}
                for name, call in sides if i % 2 == 0 else sides[::-1]:
                    timed_sides[name] = await timed(call, n)
                tcp = await asyncio.to_thread(tcp_pingpong_p50, addresses["tcp"], n)
                raw, ech, mes = timed_sides["raw"], timed_sides["echo"], timed_sides["mesh"]
                p50_unary.append(pct(mes, 0.5) / pct(raw, 0.5))
                p99_unary.append(pct(mes, 0.99) / pct(raw, 0.99))
                p50_echo.append(pct(mes, 0.5) / pct(ech, 0.5))
                con = timed_sides["contract"]
                p50_contract.append(pct(mes, 0.5) / pct(con, 0.5))
                contract_echo.append(pct(con, 0.5) / pct(ech, 0.5))
                p50_tcp.append(pct(mes, 0.5) / tcp)
                latest: dict[str, Any] = {
                    "raw_unary_p50_us": pct(raw, 0.5),
                    "bidi_echo_p50_us": pct(ech, 0.5),
                    "contract_p50_us": pct(con, 0.5),
                    "tcp_pingpong_p50_us": tcp,
                    "session_call_p50_us": pct(mes, 0.5),
                }
                # First call of a new auto session vs a plain call in an open one, one of
                # each in turn: both then follow the same work (closing the session before),
                # so the figure is the first call's own cost, not the close's wake.
                firsts: list[int] = []
                plain: list[int] = []
                for _ in range(n // 5):
                    proxy = agent.proxy("bump", session_required=True)
                    t0 = time.perf_counter_ns()
                    await proxy(**ARGS)
                    firsts.append(time.perf_counter_ns() - t0)
                    await proxy.cleanup_auto_session()
                    t0 = time.perf_counter_ns()
                    await counter(**ARGS)
                    plain.append(time.perf_counter_ns() - t0)
                first_vs_plain.append(pct(firsts, 0.5) / pct(plain, 0.5))
        await cancel_and_wait_call(echo)
        await cancel_and_wait_call(contract)
        results.update(latest)
        results["session_vs_unary_p50"] = spread(p50_unary)
        results["session_vs_unary_p99"] = spread(p99_unary)
        results["session_vs_echo_p50"] = spread(p50_echo)
        results["session_vs_contract_p50"] = spread(p50_contract)
        results["contract_vs_echo_p50"] = spread(contract_echo)
        results["session_vs_tcp_p50"] = spread(p50_tcp)
        results["first_vs_plain_p50"] = spread(first_vs_plain)

        # 64 sessions at once vs raw with 64 calls in flight.
        per = 30 if quick else 200
        tputs: list[float] = []
        for i in range(pairs):
            sessions = [agent.proxy("bump", session_required=True) for _ in range(64)]
            runs = [
                ("mesh", functools.partial(throughput, functools.partial(_caller, sessions))),
                ("raw", functools.partial(throughput, lambda i: raw_call)),
            ]
            got = {}
            for name, run in runs if i % 2 == 0 else runs[::-1]:
                got[name] = await run(64, per)
            for s in sessions:
                await s.cleanup_auto_session()
            tputs.append(got["mesh"] / got["raw"])
            results["mesh_64_sessions_calls_s"] = got["mesh"]
            results["raw_64_in_flight_calls_s"] = got["raw"]
        results["sessions_64_vs_raw"] = spread(tputs)

    results.update(await streaming(addresses, quick))

    # An injected proxy inside a consumer vs a direct proxy call, pair by pair.
    injected: list[float] = []
    async with (
        mesh.connect(addresses["consumer"]) as consumer,
        mesh.connect(addresses["agent"]) as agent,
    ):
        async with agent.proxy("bump", session_required=True) as direct:
            await direct(**ARGS)
            for i in range(pairs):
                order = ["injected", "direct"] if i % 2 == 0 else ["direct", "injected"]
                took: dict[str, float] = {}
                for name in order:
                    if name == "injected":
                        inner = await consumer.proxy("consume", timeout=120)(rounds=n)
                        took[name] = pct([int(x) for x in inner], 0.5)
                    else:
                        took[name] = pct(await timed(lambda: direct(**ARGS), n), 0.5)
                injected.append(took["injected"] / took["direct"])
                results["injected_call_p50_us"] = took["injected"]
    results["injected_vs_direct_p50"] = spread(injected)
    results.update(await large_vs_unary(addresses, min(pairs, 5), n // 2 if quick else n, quick))
    results.update(await scale(addresses, quick, n // 2 if quick else n))
    results.update(await mtls_vs_plaintext(addresses, pairs, n))
    results.update(await traced_vs_not(addresses, pairs, n))
    if "durable_agent" in addresses:
        results.update(await durable_vs_memory(addresses, pairs, n))
    await raw_channel.close()
    return results


async def cancel_and_wait_call(call: Any) -> None:
    """End a raw bidi stream the bench opened."""
    await call.done_writing()
    with contextlib.suppress(grpc.aio.AioRpcError):
        await call.code()


async def streaming(addresses: dict[str, str], quick: bool) -> dict[str, Any]:
    """Chunks/s through call_tool_auto (default buffer_size) vs a raw bidi server push of the
    same count, and the agent's StreamCall read by plain stubs that do not ask for batches
    (grpcurl, other languages: a chunk per message, like the raw push). Each run gets a fresh
    connection and the order alternates, so no side inherits a warm (or busy) connection or
    always goes first. Rates swing within a single stream on two shared cores, so the full
    run takes the median of more, shorter rounds rather than a few long ones."""
    chunks = 5_000 if quick else 20_000
    rounds = 3 if quick else 9
    start = pb.StreamCallRequest()
    start.start.call.tool = "push"
    start.start.call.arguments.update({"n": chunks})

    async def mesh_stream() -> int:
        async with mesh.connect(addresses["agent"]) as agent:
            got = 0
            async for _ in agent.proxy("push").call_tool_auto("push", {"n": chunks}):
                got += 1
            return got

    def stub_stream(address: str) -> Callable[[], Awaitable[int]]:
        async def run() -> int:
            async with grpc.aio.insecure_channel(address) as channel:
                call = pb_grpc.SessionServiceStub(channel).StreamCall()
                await call.write(start)
                await call.done_writing()
                got = 0
                async for _ in call:
                    got += 1
                return got

        return run

    rates: dict[str, list[float]] = {"mesh": [], "raw": [], "single": []}
    runs = [
        (mesh_stream, rates["mesh"]),
        (stub_stream(addresses["raw"]), rates["raw"]),
        (stub_stream(addresses["agent"]), rates["single"]),
    ]
    for round_ in range(rounds):
        for run, got_rates in runs if round_ % 2 == 0 else runs[::-1]:
            began = time.perf_counter()
            got = await run()
            got_rates.append(got / (time.perf_counter() - began))
    raw = rates["raw"]
    return {
        "raw_push_msg_s": statistics.median(raw),
        "mesh_stream_chunks_s": statistics.median(rates["mesh"]),
        "single_stream_chunks_s": statistics.median(rates["single"]),
        # Each round's runs went back to back: the median of their ratios is the steadier one.
        "stream_vs_push": spread([m / r for m, r in zip(rates["mesh"], raw, strict=True)]),
        "single_vs_push": spread([m / r for m, r in zip(rates["single"], raw, strict=True)]),
    }


def _knows(client: mesh.MeshClient, instance_id: str) -> bool:
    return instance_id in client.watch.instances


async def sigkill_seen(rounds: int) -> list[float]:
    """Milliseconds from SIGKILL of a provider process until a consumer's call in one of its
    sessions raises SessionLost (registry and provider are real processes)."""
    cli = [sys.executable, "-m", "sessionmesh.server._cli"]
    counter_file = os.path.join(
        os.path.dirname(os.path.dirname(__file__)), "examples", "counter.py"
    )
    seen: list[float] = []
    registry = await asyncio.create_subprocess_exec(
        *cli,
        "registry",
        "--port",
        "0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert registry.stdout is not None
        address = json.loads(await registry.stdout.readline())["registry"]
        async with mesh.connect(registry=address) as client:
            for _ in range(rounds):
                provider = await asyncio.create_subprocess_exec(
                    *cli,
                    "serve",
                    counter_file,
                    "--registry",
                    address,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.DEVNULL,
                )
                assert provider.stdout is not None
                instance = json.loads(await provider.stdout.readline())["instance"]
                await eventually(functools.partial(_knows, client, instance), within=10)
                counter = client.proxy("session_counter", session_required=True)
                await counter(increment=1)
                provider.kill()
                killed = time.perf_counter()
                while True:
                    try:
                        await counter(increment=1)
                    except mesh.errors.SessionLost:
                        break
                    except mesh.errors.AgentUnavailable:
                        pass
                    await asyncio.sleep(0.001)
                seen.append((time.perf_counter() - killed) * 1000)
                await provider.wait()
                await counter.cleanup_auto_session()
    finally:
        registry.terminate()
        await registry.wait()
    return seen


def table(r: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """Rows: figure, median, spread of the pairs, target, detail."""

    def row(name: str, key: str, target: str, detail: str) -> tuple[str, str, str, str, str]:
        if key not in r:
            return (name, "-", "-", target, "full run only")
        f = r[key]
        return (name, f"{f['median']:.2f}", f"{f['min']:.2f}-{f['max']:.2f}", target, detail)

    us = "µs"
    return [
        row(
            "session call p50 ÷ raw unary p50",
            "session_vs_unary_p50",
            "≤ 1.0",
            f"{r['session_call_p50_us']:.0f} vs {r['raw_unary_p50_us']:.0f} {us} (last pair)",
        ),
        row("session call p99 ÷ raw unary p99", "session_vs_unary_p99", "≤ 1.0", ""),
        row(
            "session call p50 ÷ bare contract round trip p50",
            "session_vs_contract_p50",
            "≤ 1.15",
            f"contract {r['contract_p50_us']:.0f} {us}: the same Struct work, no session code",
        ),
        row(
            "session call p50 ÷ grpc.aio bidi echo p50 (transport floor)",
            "session_vs_echo_p50",
            "-",
            f"echo {r['bidi_echo_p50_us']:.0f} {us}",
        ),
        row(
            "bare contract round trip p50 ÷ grpc.aio bidi echo p50",
            "contract_vs_echo_p50",
            "-",
            "what the contract's encoding alone costs",
        ),
        row(
            "session call p50 ÷ plain TCP ping-pong p50",
            "session_vs_tcp_p50",
            "-",
            f"TCP {r['tcp_pingpong_p50_us']:.0f} {us}",
        ),
        row("first call of a new auto session ÷ plain call", "first_vs_plain_p50", "≤ 1.15", ""),
        row(
            "64 concurrent sessions ÷ raw 64 in flight",
            "sessions_64_vs_raw",
            "≥ 1.3",
            f"{r['mesh_64_sessions_calls_s']:.0f} vs {r['raw_64_in_flight_calls_s']:.0f} "
            "calls/s (last pair)",
        ),
        row(
            "call_tool_auto chunks/s (default buffer_size) ÷ raw bidi push",
            "stream_vs_push",
            "≥ 0.95",
            f"{r['mesh_stream_chunks_s']:.0f} vs {r['raw_push_msg_s']:.0f} msg/s (medians); "
            "batched while a write is out",
        ),
        row(
            "agent's StreamCall, a chunk per message (stubs that ask no batches) ÷ raw push",
            "single_vs_push",
            "≈ 1",
            f"{r['single_stream_chunks_s']:.0f} chunks/s (median): grpcurl, other languages",
        ),
        row(
            "call with a 200 KB argument ÷ raw unary, same bytes",
            "large_200KB_vs_unary",
            "≤ 1.0",
            f"{r['large_200KB_bytes'] / 1000:.0f} KB encoded, a list of objects",
        ),
        row(
            "call with a 2 MB argument ÷ raw unary, same bytes",
            "large_2MB_vs_unary",
            "≤ 1.0",
            f"{r.get('large_2MB_bytes', 0) / 1000:.0f} KB encoded",
        ),
        row(
            "session call p50 over mutual TLS ÷ plaintext",
            "mtls_vs_plaintext_p50",
            "≈ 1",
            f"{r['mtls_call_p50_us']:.0f} {us} over mTLS (last pair)",
        ),
        row(
            "session call p50, traced both sides ÷ not",
            "traced_vs_not_p50",
            "-",
            "OpenTelemetry SDK recording, batch export",
        ),
        row(
            "injected-proxy call ÷ direct proxy call",
            "injected_vs_direct_p50",
            "≤ 1.0",
            f"{r['injected_call_p50_us']:.0f} {us} (last pair)",
        ),
        row(
            f"session call p50 with {r['idle_sessions_open']:,} idle sessions ÷ with none",
            "idle_sessions_flatness",
            "≈ 1",
            "each as a ratio to raw unary in the same run: flat is 1",
        ),
        (
            f"{r['wide_sessions']:,} sessions calling at once",
            f"{r['wide_mesh_calls_s']:.0f}/s",
            "-",
            "-",
            "raw grpc.aio, as many unary calls in flight on one channel: "
            + (
                f"{r['wide_raw']:.0f}/s" if isinstance(r["wide_raw"], float) else str(r["wide_raw"])
            ),
        ),
        (
            "server memory per idle session",
            f"{r['idle_session_bytes']:.0f} B",
            "-",
            "≤ 2 KB",
            f"{r['idle_sessions']} sessions open",
        ),
        *(
            [
                row(
                    "durable session call p50 ÷ in-memory session call p50",
                    "durable_vs_memory_p50",
                    "≤ 1.35",
                    f"{r['durable_call_p50_us']:.0f} {us}, Redis on loopback (last pair)",
                ),
                (
                    "SIGKILL of a durable session's owner -> first call answered elsewhere",
                    f"{statistics.median(r['takeover_ms']):.0f} ms",
                    f"{min(r['takeover_ms']):.0f}-{max(r['takeover_ms']):.0f}",
                    "≤ 100 ms",
                    f"{len(r['takeover_ms'])} kills, count intact each time",
                ),
            ]
            if "takeover_ms" in r
            else []
        ),
        (
            "SIGKILL of a provider -> consumer sees its session lost",
            f"{statistics.median(r['sigkill_seen_ms']):.0f} ms",
            f"{min(r['sigkill_seen_ms']):.0f}-{max(r['sigkill_seen_ms']):.0f}",
            "≤ 1 s",
            f"{len(r['sigkill_seen_ms'])} kills",
        ),
    ]


@contextlib.contextmanager
def _serving(flag: str, env: dict[str, str]) -> Iterator[dict[str, str]]:
    """A serving child process (``--serve``, ``--serve-traced``): the addresses it printed;
    SIGTERMed at the end."""
    child = subprocess.Popen(
        [sys.executable, __file__, flag], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert child.stdout is not None
        yield json.loads(child.stdout.readline())
    finally:
        child.send_signal(signal.SIGTERM)
        child.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(prog="scripts/bench")
    parser.add_argument(
        "--quick", action="store_true", help="smaller counts, under a minute (no 2 MB calls)"
    )
    parser.add_argument("--json", default="bench-results.json", help="where to write the figures")
    parser.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        default=os.environ.get("SESSIONMESH_LOOP") or "asyncio",
        help="the event loop of every side, sessionmesh and raw grpc.aio alike (uvloop: "
        "sessionmesh[fast]; the default stays asyncio, so runs compare across machines)",
    )
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-traced", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ["SESSIONMESH_LOOP"] = args.loop  # this process, its children, their agents
    # SIGTERM unwinds like Ctrl-C: the servers it started (its Redis too) are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.serve:
        mesh.run(serve())
        return
    if args.serve_traced:
        mesh.run(serve_traced())
        return
    import logging

    logging.disable(logging.WARNING)  # the SIGKILL run warns about sessions it cannot close
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]
        ),
    }
    with contextlib.ExitStack() as children:
        store = children.enter_context(redis_server())
        addresses: dict[str, str] = {}
        for flag in ("--serve", "--serve-traced"):
            addresses.update(children.enter_context(_serving(flag, {**env, **env_with(store)})))
        results = mesh.run(measure(addresses, args.quick))
        if store is not None:
            results["takeover_ms"] = mesh.run(takeover_ms(store, 2 if args.quick else 5))
        else:
            print("redis-server is not installed: no durable-session figures")
    results["sigkill_seen_ms"] = mesh.run(sigkill_seen(1 if args.quick else 3))
    count = 10_000 if args.quick else 100_000
    results["idle_sessions"] = count
    results["idle_session_bytes"] = idle_session_bytes(count)
    rows = table(results)
    width = max(len(r[0]) for r in rows)
    print(
        f"sessionmesh bench ({'quick' if args.quick else 'full'}, {args.loop}) on "
        f"{platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, grpcio {grpc.__version__}"
    )
    print("every ratio: the median of alternating A/B pairs, and the pairs' spread (min-max)")
    print(f"{'figure':<{width}}  {'median':>8}  {'spread':>11}  {'target':>7}  detail")
    for name, value, pairs_spread, target, detail in rows:
        print(f"{name:<{width}}  {value:>8}  {pairs_spread:>11}  {target:>7}  {detail}")
    Path(args.json).write_text(json.dumps({"results": results, "table": rows}, indent=2))


if __name__ == "__main__":
    main()
