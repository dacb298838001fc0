"""Bad input from outside clients: refused with a clear status, never hurting other calls."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from sessionmesh import mesh
from sessionmesh.client.errors import InvalidArguments
from sessionmesh.testing import running_agent
from sessionmesh.v1 import session_service_pb2 as pb
from sessionmesh.v1 import session_service_pb2_grpc as pb_grpc
from sessionmesh.wire.status import decode, details_in
from tests.tools import increment, running_total, stream_count

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("value", ["0", "false", "", "yes"])
async def test_session_create_must_say_yes_to_open_a_session(value: str) -> None:
    async with running_agent(increment) as (agent, _):
        async with grpc.aio.insecure_channel(agent.address) as channel:
            stub = pb_grpc.SessionServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Call(
                    pb.CallRequest(tool="increment"), metadata=(("x-session-create", value),)
                )
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            detail = decode(details_in(info.value.trailing_metadata()))
            assert detail.reason == "INVALID_ARGUMENTS"
            assert detail.metadata["field"] == "x-session-create"
            assert len(agent.sessions) == 0


@pytest.mark.parametrize("value", ["1", "true", "TRUE"])
async def test_session_create_opens_a_session_when_it_says_so(value: str) -> None:
    async with running_agent(increment) as (agent, _):
        async with grpc.aio.insecure_channel(agent.address) as channel:
            stub = pb_grpc.SessionServiceStub(channel)
            call = stub.Call(
                pb.CallRequest(tool="increment"), metadata=(("x-session-create", value),)
            )
            assert (await call).result.number_value == 1
            assert len(agent.sessions) == 1


async def test_a_streamed_call_with_bad_arguments_raises_invalid_arguments() -> None:
    async def numbers() -> object:
        yield 1

    async with running_agent(increment, stream_count, running_total) as (agent, client):
        for _ in range(5):  # it used to crash the client most of the time
            async with client.proxy("session_counter", session_required=True) as proxy:
                with pytest.raises(InvalidArguments) as info:
                    async for _ in proxy.call_tool_auto("stream_count", {"n": "three"}):
                        pass
                assert info.value.field == "n"
            with pytest.raises(InvalidArguments):
                chunks = client.proxy("running_total").call_tool_auto(
                    args={"numbers": numbers(), "extra": 1}
                )
                async for _ in chunks:
                    pass
        assert len(agent.sessions) == 0


async def test_a_duplicate_exchange_id_in_flight_is_refused_on_that_id() -> None:
    started = asyncio.Event()
    release = asyncio.Event()

    @mesh.tool
    async def hold() -> str:
        started.set()
        await release.wait()
        return "held"

    async with running_agent(hold, increment) as (agent, _):
        async with grpc.aio.insecure_channel(agent.address) as channel:
            stream = pb_grpc.SessionServiceStub(channel).Exchange()
            await stream.write(pb.ExchangeRequest(id=7, call=pb.CallRequest(tool="hold")))
            await asyncio.wait_for(started.wait(), 5)
            await stream.write(pb.ExchangeRequest(id=7, call=pb.CallRequest(tool="hold")))
            refused = await asyncio.wait_for(stream.read(), 5)
            assert isinstance(refused, pb.ExchangeResponse)
            assert (
                refused.id == 7 and refused.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            )
            assert decode(refused.error.details).reason == "INVALID_STREAM"
            assert "already in flight" in refused.error.message
            release.set()
            first = await asyncio.wait_for(stream.read(), 5)
            assert isinstance(first, pb.ExchangeResponse)
            assert first.id == 7 and first.result.string_value == "held"  # the first still answers
            await stream.done_writing()
            assert await asyncio.wait_for(stream.code(), 5) == grpc.StatusCode.OK
