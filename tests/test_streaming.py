"""StreamCall inside sessions: state, cancellation, input streams, flow control, deadlines."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from sessionmesh import mesh
from sessionmesh.errors import (
    CallTimeout,
    SessionNotFound,
    ToolFailed,
    ToolTimeout,
    UsageError,
)
from sessionmesh.testing import eventually, running_agent
from sessionmesh.v1 import session_service_pb2 as pb
from sessionmesh.v1 import session_service_pb2_grpc as pb_grpc
from sessionmesh.wire.codec import from_value
from tests.tools import increment, running_total, stream_count

pytestmark = pytest.mark.anyio


async def test_stream_sees_the_session_state() -> None:
    async with running_agent(increment, stream_count) as (agent, client):
        async with client.proxy("session_counter", session_required=True) as counter:
            await counter(increment=1)
            await counter(increment=2)
            chunks = [c async for c in counter.call_tool_auto("stream_count", {"start": 1, "n": 3})]
            assert chunks == [{"i": 1, "count": 3}, {"i": 2, "count": 3}, {"i": 3, "count": 3}]
            assert await counter(increment=3) == 6
        assert len(agent.sessions) == 0


async def test_stream_can_open_the_auto_session() -> None:
    async with running_agent(increment, stream_count) as (agent, client):
        async with client.proxy("stream_count", session_required=True) as streamer:
            assert [c["i"] async for c in streamer.stream(n=2)] == [1, 2]
            assert streamer.session_id is not None
            assert await streamer("session_counter", {"increment": 4}) == 4
            assert len(agent.sessions) == 1
        assert len(agent.sessions) == 0


async def test_streaming_option_makes_calls_stream() -> None:
    async with running_agent(increment, stream_count) as (_, client):
        async with client.proxy("stream_count", session_required=True, streaming=True) as s:
            assert [c["i"] async for c in s(start=5, n=2)] == [5, 6]


async def test_cancelling_a_stream_leaves_the_session_usable() -> None:
    produced = 0
    finished = asyncio.Event()

    @mesh.tool(session_required=True)
    async def forever(session: mesh.Session) -> AsyncIterator[int]:
        nonlocal produced
        try:
            while True:
                produced += 1
                session.state["produced"] = produced
                yield produced
        finally:
            finished.set()

    async with running_agent(forever, increment) as (agent, client):
        async with client.proxy("forever", session_required=True) as proxy:
            async with proxy.stream() as chunks:
                got = [await anext(chunks), await anext(chunks)]
            assert got == [1, 2]
            await asyncio.wait_for(finished.wait(), timeout=5)
            assert await proxy("session_counter", {"increment": 1}) == 1
            assert len(agent.sessions) == 1
        assert len(agent.sessions) == 0


async def test_slow_reader_with_small_buffer_holds_the_tool_back() -> None:
    produced = 0

    @mesh.tool(buffer_size=1_000_000)  # the agent's own cap: leave it to the reader
    async def firehose() -> AsyncIterator[str]:
        nonlocal produced
        while produced < 100_000:
            produced += 1
            yield "x" * 100

    async with running_agent(firehose) as (_, client):
        proxy = client.proxy("firehose", buffer_size=4)
        async with proxy.stream() as chunks:
            consumed = 0
            for _ in range(10):
                await anext(chunks)
                consumed += 1
                # Credit goes back every second chunk, so the agent may run up to the window
                # past what was credited, plus the one chunk waiting for credit. Wait until it
                # has, then check it went no further: a leaky window runs to 100,000.
                credited = consumed - consumed % 2
                limit = credited + 4 + 1
                await eventually(
                    functools.partial(lambda n: produced >= n, limit), what="the window fills"
                )
                assert produced == limit, (produced, consumed)
        # Without the window, HTTP/2 buffers alone would let thousands of chunks pile up.
        unbounded = client.proxy("firehose", buffer_size=1_000_000)
        produced = 0
        async with unbounded.stream() as chunks:
            await anext(chunks)
            await eventually(lambda: produced > 1000, what="an unbounded stream runs ahead")


async def test_input_stream_goes_over_the_same_stream() -> None:
    async def numbers() -> AsyncIterator[int]:
        for n in (1, 2, 3, 4):
            yield n

    async with running_agent(running_total) as (_, client):
        totals = [
            t
            async for t in client.proxy("running_total").call_tool_auto(args={"numbers": numbers()})
        ]
        assert totals == [1, 3, 6, 10]
        tight = client.proxy("running_total", buffer_size=1)
        assert [t async for t in tight.call_tool_auto(args={"numbers": numbers()})] == [1, 3, 6, 10]


async def test_stream_timeout_bounds_the_whole_stream() -> None:
    @mesh.tool
    async def slow_ticks() -> AsyncIterator[int]:
        n = 0
        while True:
            n += 1
            yield n
            await asyncio.sleep(0.05)

    @mesh.tool(stream_timeout=0.2)
    async def bounded_ticks() -> AsyncIterator[int]:
        async for n in slow_ticks():
            yield n

    async with running_agent(slow_ticks, bounded_ticks) as (_, client):
        with pytest.raises(CallTimeout):
            async for _ in client.proxy("slow_ticks", stream_timeout=0.2).stream():
                pass
        with pytest.raises(ToolTimeout):
            async for _ in client.proxy("bounded_ticks").stream():
                pass


async def test_a_failing_stream_raises_after_its_chunks() -> None:
    @mesh.tool
    async def breaks() -> AsyncIterator[int]:
        yield 1
        raise KeyError("gone")

    async with running_agent(breaks) as (_, client):
        got: list[int] = []
        with pytest.raises(ToolFailed) as info:
            async for chunk in client.proxy("breaks").stream():
                got.append(chunk)
        assert got == [1]
        assert info.value.remote_type == "KeyError"


async def test_unary_call_of_a_streaming_tool_collects_its_chunks() -> None:
    async with running_agent(stream_count) as (_, client):
        async with client.proxy("stream_count", session_required=True) as p:
            assert [c["i"] for c in await p(n=3)] == [1, 2, 3]


async def test_a_window_larger_than_the_tools_cap_does_not_stall() -> None:
    @mesh.tool(buffer_size=8)
    async def capped(n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    async with running_agent(capped) as (_, client):
        eager = client.proxy("capped", buffer_size=1000)  # the agent grants 8, and says so

        async def read_all() -> list[int]:
            return [c async for c in eager.stream(n=500)]

        assert await asyncio.wait_for(read_all(), 10) == list(range(500))


async def test_closing_a_session_cancels_its_stream_and_queued_calls() -> None:
    closed: list[str] = []

    @mesh.tool(session_required=True)
    async def endless(session: mesh.Session) -> AsyncIterator[int]:
        if not session.state:
            session.state["open"] = True
            session.on_close(lambda: closed.append(session.short_id))
        n = 0
        while True:
            n += 1
            yield n

    async with running_agent(endless, increment) as (agent, client):
        proxy = client.proxy("endless", session_required=True)
        chunks = proxy.options(buffer_size=2).stream()
        assert await anext(chunks) == 1  # the stream holds the session's turn
        sid = proxy.session_id
        assert sid is not None
        queued = asyncio.create_task(proxy("session_counter", {"increment": 1}))
        await eventually(lambda: agent.sessions.get(sid).waiting == 1, what="a call queues")
        # An endless stream used to hold CloseSession forever.
        assert await asyncio.wait_for(client.proxy("endless").close_session(sid), 10) is True
        with pytest.raises(SessionNotFound, match="closed while this call ran"):
            async for _ in chunks:
                pass
        with pytest.raises(SessionNotFound):
            await queued
        assert closed == [sid[:14]]  # the callback ran, once
        assert len(agent.sessions) == 0
        await proxy.cleanup_auto_session()


async def test_streaming_true_on_a_plain_tool_streams_its_result_and_leaves_proxies_plain() -> None:
    @mesh.tool(
        capability="one_shot", dependencies=["stream_count"], session_required=True, streaming=True
    )
    async def one_shot(stream_count: mesh.McpAgent | None = None) -> dict[str, Any]:
        assert isinstance(stream_count, mesh.Proxy)  # the tool's streaming is its own
        chunks = [c["i"] async for c in stream_count.call_tool_auto("stream_count", {"n": 2})]
        return {"chunks": chunks}

    async with running_agent(stream_count) as (provider, _):
        peers = {"stream_count": provider.address}
        async with running_agent(one_shot, peers=peers) as (_, client):
            [listed] = await client.list_tools()
            assert listed["streaming"] is True
            assert [c async for c in client.proxy("one_shot").stream()] == [{"chunks": [1, 2]}]
            assert await client.proxy("one_shot")() == {"chunks": [1, 2]}


async def test_awaiting_a_stream_says_what_to_write_instead() -> None:
    async with running_agent(stream_count) as (_, client):
        streaming = client.proxy("stream_count", session_required=True, streaming=True)
        with pytest.raises(UsageError, match="async for chunk in"):
            await streaming(n=1)


async def _raw_stream(address: str, tool: str, args: dict[str, Any], max_batch: int) -> list[Any]:
    """The messages of one StreamCall read with plain grpc stubs: each one's chunks."""
    async with grpc.aio.insecure_channel(address) as channel:
        start = pb.StreamCallRequest()
        start.start.call.tool = tool
        start.start.call.arguments.update(args)
        start.start.max_batch = max_batch
        call = pb_grpc.SessionServiceStub(channel).StreamCall()
        await call.write(start)
        await call.done_writing()
        messages: list[Any] = []
        async for message in call:
            if message.WhichOneof("kind") == "chunks":
                messages.append([from_value(v) for v in message.chunks.values])
            else:
                assert message.WhichOneof("kind") == "chunk"
                messages.append(from_value(message.chunk))
        return messages


async def test_a_tool_faster_than_the_wire_sends_its_chunks_in_batches() -> None:
    @mesh.tool(buffer_size=1_000_000)
    async def burst(n: int, size: int = 0) -> AsyncIterator[Any]:
        for i in range(n):
            yield "x" * size if size else i

    async with running_agent(burst) as (agent, _):
        # A client that takes batches gets what the tool yields while a write is in flight
        # together, in order: the first chunk alone (nothing was being written), then full
        # batches, as the tool never waits.
        batched = await _raw_stream(agent.address, "burst", {"n": 2000}, max_batch=64)
        assert [c for m in batched for c in m] == list(range(2000))
        assert batched[0] == [0]
        assert max(len(m) for m in batched) == 64
        assert len(batched) == 1 + -(-1999 // 64)
        # Big chunks close a batch at about 64 KiB; a chunk bigger than that goes alone.
        big = await _raw_stream(agent.address, "burst", {"n": 40, "size": 20_000}, 64)
        assert [len(c) for m in big for c in m] == [20_000] * 40
        assert max(len(m) for m in big) == 3
        huge = await _raw_stream(agent.address, "burst", {"n": 3, "size": 1_000_000}, 64)
        assert [[len(c) for c in m] for m in huge] == [[1_000_000]] * 3
        # grpcurl, other languages' stubs, anyone who does not ask: a chunk per message.
        single = await _raw_stream(agent.address, "burst", {"n": 100}, max_batch=0)
        assert single == list(range(100))


async def test_a_chunk_never_waits_for_others_to_join_it() -> None:
    release = asyncio.Event()

    @mesh.tool
    async def drip() -> AsyncIterator[int]:
        yield 1
        yield 2  # while 1 is being written: it waits in a batch ...
        await release.wait()  # ... which leaves as soon as 1 is out, though the tool waits
        yield 3

    async with running_agent(drip) as (_, client):
        async with client.proxy("drip").stream() as chunks:
            assert await asyncio.wait_for(anext(chunks), 10) == 1
            assert await asyncio.wait_for(anext(chunks), 10) == 2
            release.set()
            assert await asyncio.wait_for(anext(chunks), 10) == 3


async def test_a_stream_open_when_its_client_closes_raises_a_usage_error() -> None:
    # grpc ends a call cut off by its channel closing with CancelledError, in a task nobody
    # cancelled: raised as it is, it would make the reader's task look cancelled.
    async with running_agent(increment, stream_count) as (agent, _):
        client = mesh.connect(agent.address)
        async with client:
            proxy = client.proxy("stream_count", session_required=True)
            stream = proxy.stream(n=1000)
            assert (await anext(stream))["i"] == 1
        with pytest.raises(UsageError, match="client was closed while it was open"):
            async for _ in stream:
                pass
        assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
