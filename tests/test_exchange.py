"""The shared Exchange stream under load: several calls (and answers) to a message, once both
sides have said they take them, and never otherwise."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from sessionmesh import mesh
from sessionmesh.testing import eventually, running_agent
from sessionmesh.v1 import session_service_pb2 as pb
from sessionmesh.v1 import session_service_pb2_grpc as pb_grpc
from sessionmesh.wire.codec import from_value
from sessionmesh.wire.keys import EXCHANGE_BATCH_KEY

pytestmark = pytest.mark.anyio


@mesh.tool(session_required=True)
async def increment(session: mesh.Session) -> int:
    """Never waits: the agent answers it in the step that read it."""
    session.state["n"] = session.state.get("n", 0) + 1
    return int(session.state["n"])


_ASK = ((EXCHANGE_BATCH_KEY, "1"),)


def _call(call_id: int, session_id: str = "", create: bool = False) -> pb.ExchangeRequest:
    message = pb.ExchangeRequest(id=call_id, session_id=session_id, create_session=create)
    message.call.tool = "increment"
    return message


async def _answers(call: Any, count: int) -> tuple[list[pb.ExchangeResponse], int]:
    """``count`` answers, flattened, and how many messages brought them."""
    answers: list[pb.ExchangeResponse] = []
    messages = 0
    while len(answers) < count:
        message = await call.read()
        messages += 1
        answers += [message, *message.more]
    return answers, messages


async def test_an_agent_takes_several_calls_in_one_message_and_runs_them_in_order() -> None:
    async with running_agent(increment) as (agent, _):
        async with grpc.aio.insecure_channel(agent.address) as channel:
            call = pb_grpc.SessionServiceStub(channel).Exchange(metadata=_ASK)
            assert dict(await call.initial_metadata()).get(EXCHANGE_BATCH_KEY) == "1"
            await call.write(_call(1, create=True))
            (opened,), _ = await _answers(call, 1)
            sid = opened.session_id
            batch = _call(2, sid)
            batch.more.extend([_call(i, sid) for i in range(3, 12)])
            await call.write(batch)
            answers, messages = await _answers(call, 10)
            # One session, so one at a time in the order sent; the answers came batched.
            assert [(a.id, from_value(a.result)) for a in answers] == [(i, i) for i in range(2, 12)]
            assert messages < 10
            await call.done_writing()


async def test_a_client_that_does_not_ask_gets_an_answer_per_message() -> None:
    async with running_agent(increment) as (agent, _):
        async with grpc.aio.insecure_channel(agent.address) as channel:
            call = pb_grpc.SessionServiceStub(channel).Exchange()
            await call.write(_call(1, create=True))
            (opened,), _ = await _answers(call, 1)
            assert EXCHANGE_BATCH_KEY not in dict(await call.initial_metadata())
            batch = _call(2, opened.session_id)
            batch.more.extend([_call(i, opened.session_id) for i in range(3, 12)])
            await call.write(batch)  # still taken: an agent that has `more` reads it
            answers, messages = await _answers(call, 10)
            assert [from_value(a.result) for a in answers] == list(range(2, 12))
            assert messages == 10
            await call.done_writing()


class _Counting(pb_grpc.SessionServiceServicer):
    """An Exchange peer that answers every call with 1 and counts the messages that carried
    several; it says it takes batches only when ``announce``."""

    def __init__(self, announce: bool) -> None:
        self.announce = announce
        self.calls = 0
        self.batched = 0

    async def Exchange(  # type: ignore[override]
        self,
        request_iterator: AsyncIterator[pb.ExchangeRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        if self.announce:
            await context.send_initial_metadata(_ASK)
        async for message in request_iterator:
            self.batched += bool(message.more)
            for one in (message, *message.more):
                self.calls += 1
                answer = pb.ExchangeResponse(id=one.id)
                answer.result.number_value = 1
                await context.write(answer)


@pytest.mark.parametrize("announce", [True, False])
async def test_the_client_batches_calls_only_for_an_agent_that_takes_them(announce: bool) -> None:
    peer = _Counting(announce)  # type: ignore[abstract]  # only Exchange is served
    server = grpc.aio.server()
    pb_grpc.add_SessionServiceServicer_to_server(peer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with asyncio.timeout(10), mesh.connect(f"127.0.0.1:{port}") as client:
            proxy = client.proxy("anything")
            await proxy()  # the stream is open, the agent's headers read
            # 64 callers at once: all but the first find a write in flight and wait for it.
            assert await asyncio.gather(*(proxy() for _ in range(64))) == [1] * 64
        assert peer.calls == 65
        assert (peer.batched > 0) is announce
    finally:
        await server.stop(0)


async def test_many_sessions_at_once_over_one_batched_stream_keep_each_sessions_order() -> None:
    async with running_agent(increment) as (_, client):
        proxies = [client.proxy("increment", session_required=True) for _ in range(32)]

        async def count(proxy: mesh.Proxy) -> list[int]:
            return [await proxy() for _ in range(20)]

        try:
            assert await asyncio.gather(*(count(p) for p in proxies)) == [list(range(1, 21))] * 32
        finally:
            for proxy in proxies:
                await proxy.cleanup_auto_session()


async def test_each_call_of_a_batch_is_refused_or_run_on_its_own() -> None:
    async with running_agent(increment) as (agent, _):
        async with grpc.aio.insecure_channel(agent.address) as channel:
            call = pb_grpc.SessionServiceStub(channel).Exchange(metadata=_ASK)
            unknown = agent.instance_id + ".AAAAAAAAAAAAAAAAAAAAAA"
            batch = _call(1, session_id=unknown)  # refused: no such session
            nope = _call(2, create=True)
            nope.call.tool = "nope"  # refused: no such tool
            opens = _call(3, create=True)
            opens.more.append(_call(4, create=True))  # a batch inside a batch: flattened
            batch.more.extend([nope, opens])
            await call.write(batch)
            answers, _ = await _answers(call, 4)
            outcome = {
                a.id: a.error.code if a.HasField("error") else from_value(a.result) for a in answers
            }
            assert outcome == {
                1: grpc.StatusCode.NOT_FOUND.value[0],
                2: grpc.StatusCode.NOT_FOUND.value[0],
                3: 1,
                4: 1,
            }
            assert len({a.session_id for a in answers if a.id in (3, 4)}) == 2
            await call.done_writing()


async def test_answers_piled_up_behind_a_client_that_does_not_read_all_go_out() -> None:
    # The client reads nothing for a while: the agent's write waits on it, the answers of
    # calls that end meanwhile pile up past the bound and their tasks wait for room. Every
    # one of them must be woken once the client reads, or the stream could never end.
    release = asyncio.Event()
    started = 0

    @mesh.tool
    async def held(size: int) -> str:
        nonlocal started
        started += 1
        await release.wait()
        return "x" * size

    count = 400
    async with running_agent(held) as (agent, _):
        async with grpc.aio.insecure_channel(agent.address) as channel:
            call = pb_grpc.SessionServiceStub(channel).Exchange()
            for i in range(1, count + 1):
                message = pb.ExchangeRequest(id=i)
                message.call.tool = "held"
                message.call.arguments["size"] = 16_384
                await call.write(message)
            # Every call has started (and waits) once the agent holds them all.
            await eventually(lambda: started == count, what="every call held")
            release.set()
            answers, _ = await _answers(call, count)
            assert sorted(a.id for a in answers) == list(range(1, count + 1))
            await call.done_writing()
            async with asyncio.timeout(10):  # the stream ends once every call has ended
                assert await call.code() == grpc.StatusCode.OK
