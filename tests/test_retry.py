"""Retries never run a tool twice: a lost response is answered from the agent's memory."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest

from sessionmesh import mesh
from sessionmesh.errors import AgentUnavailable
from sessionmesh.testing import running_agent
from sessionmesh.v1 import session_service_pb2 as pb
from sessionmesh.v1 import session_service_pb2_grpc as pb_grpc

pytestmark = pytest.mark.anyio

CALL = "/sessionmesh.v1.SessionService/Call"
EXCHANGE = "/sessionmesh.v1.SessionService/Exchange"


class _LosingContext:
    """A servicer context whose `write` of a chosen answer breaks the stream instead."""

    def __init__(self, context: Any, fault: LoseResponses) -> None:
        self._context = context
        self._fault = fault

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def write(self, message: Any) -> None:
        if self._fault.answered():
            await self._context.abort(grpc.StatusCode.UNAVAILABLE, "injected fault: response lost")
        await self._context.write(message)


class LoseResponses(grpc.aio.ServerInterceptor):
    """A fault: a call runs on the agent, then its response is lost (UNAVAILABLE), whether it
    came as a unary Call or on an Exchange stream."""

    def __init__(self, lose: set[int]) -> None:
        self.lose = lose
        self.answers = 0

    def answered(self) -> bool:
        """Count an answer; True if this one is to be lost."""
        self.answers += 1
        return self.answers in self.lose

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(details)
        if handler is None:
            return handler
        if details.method == CALL:
            unary: Any = handler.unary_unary

            async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                response = await unary(request, context)
                if self.answered():
                    await context.abort(
                        grpc.StatusCode.UNAVAILABLE, "injected fault: response lost"
                    )
                return response

            return grpc.unary_unary_rpc_method_handler(
                call,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if details.method == EXCHANGE:
            streaming: Any = handler.stream_stream

            async def stream(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                return await streaming(requests, _LosingContext(context, self))

            return grpc.stream_stream_rpc_method_handler(
                stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


async def test_lost_responses_are_retried_and_the_tool_runs_once() -> None:
    runs: list[int] = []

    @mesh.tool(session_required=True)
    def bump(session: mesh.Session, n: int) -> int:
        runs.append(n)
        session.state["total"] = session.state.get("total", 0) + n
        return int(session.state["total"])

    # The call that opens the session, and a later one.
    fault = LoseResponses(lose={1, 4})
    async with running_agent(bump, interceptors=[fault]) as (agent, client):
        async with client.proxy("bump", session_required=True, retry_count=2, retry_delay=0) as p:
            assert [await p(n=n) for n in (1, 2, 3)] == [1, 3, 6]
        assert runs == [1, 2, 3]
        assert fault.answers == 5  # 3 calls + 2 retries answered from memory
        assert agent.sessions.counters["created"] == 1


async def test_lost_response_without_session_is_deduplicated_too() -> None:
    runs = 0

    @mesh.tool
    def once() -> int:
        nonlocal runs
        runs += 1
        return runs

    fault = LoseResponses(lose={1})
    async with running_agent(once, interceptors=[fault]) as (_, client):
        assert await client.proxy("once", retry_count=1, retry_delay=0)() == 1
        assert runs == 1


async def test_without_retries_the_fault_surfaces_as_unavailable() -> None:
    @mesh.tool
    def noop() -> None:
        return None

    async with running_agent(noop, interceptors=[LoseResponses(lose={1})]) as (_, client):
        with pytest.raises(AgentUnavailable, match="response lost"):
            await client.proxy("noop")()


async def test_retry_gives_up_after_retry_count() -> None:
    with socket.socket() as s:  # a port that was bound and closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    async with mesh.connect(address) as client:
        with pytest.raises(AgentUnavailable):
            await client.proxy("noop", retry_count=2, retry_delay=0, timeout=2)()


async def test_a_unary_call_retried_by_another_client_is_answered_from_memory() -> None:
    runs = 0

    @mesh.tool
    def once() -> int:
        nonlocal runs
        runs += 1
        return runs

    fault = LoseResponses(lose={1})
    async with running_agent(once, interceptors=[fault]) as (agent, _):
        async with grpc.aio.insecure_channel(agent.address) as channel:
            stub = pb_grpc.SessionServiceStub(channel)
            request = pb.CallRequest(tool="once", call_id="client-chosen-id-1")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Call(request)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert (await stub.Call(request)).result.number_value == 1
            assert runs == 1


async def test_the_call_id_memory_is_bounded_in_bytes_and_keeps_the_recent_calls() -> None:
    runs = 0

    @mesh.tool
    def megabyte(n: int) -> str:
        nonlocal runs
        runs += 1
        return str(n) * (1 << 20)

    limit = 8 << 20
    async with running_agent(megabyte, remembered_bytes=limit) as (agent, _):
        async with grpc.aio.insecure_channel(agent.address) as channel:
            stub = pb_grpc.SessionServiceStub(channel)

            def call(n: int) -> Any:
                request = pb.CallRequest(tool="megabyte", call_id=f"mb-{n}")
                request.arguments.update({"n": n % 10})
                return stub.Call(request)

            for n in range(20):  # 20 MiB of results with call ids
                await call(n)
            assert runs == 20
            recall = agent._runner.recall  # type: ignore[union-attr]
            assert recall.bytes <= limit < 20 << 20  # bounded, not all 20 MiB kept
            await call(19)  # the latest: answered from memory, not run again
            assert runs == 20
            await call(0)  # the oldest was forgotten to stay in bounds: it runs again
            assert runs == 21


async def test_stopping_the_agent_ends_calls_whose_callers_went_away() -> None:
    started = asyncio.Event()
    ended: list[str] = []

    @mesh.tool
    async def linger() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            ended.append("cancelled")
            raise

    async with running_agent(linger) as (agent, _):
        async with grpc.aio.insecure_channel(agent.address) as channel:
            stub = pb_grpc.SessionServiceStub(channel)
            call = stub.Call(pb.CallRequest(tool="linger", call_id="gone-caller-1"))
            await asyncio.wait_for(started.wait(), 10)
            call.cancel()  # the caller goes away: a call with an id runs on, for a retry
        assert ended == []
        await agent.stop(grace=0)
        assert ended == ["cancelled"]  # stop() does not leave it running on the loop
