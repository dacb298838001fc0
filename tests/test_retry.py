"""Retries never run a tool twice: a lost response is answered from the agent's memory."""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest

from sessionmesh import mesh
from sessionmesh.client.errors import AgentUnavailable
from sessionmesh.testing import running_agent

pytestmark = pytest.mark.anyio

CALL = "/sessionmesh.v1.SessionService/Call"


class LoseResponses(grpc.aio.ServerInterceptor):
    """A fault: the call runs on the agent, then its response is lost (UNAVAILABLE)."""

    def __init__(self, lose: set[int]) -> None:
        self.lose = lose
        self.calls = 0

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(details)
        if handler is None or details.method != CALL:
            return handler
        inner: Any = handler.unary_unary
        assert inner is not None

        async def behaviour(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            self.calls += 1
            response = await inner(request, context)
            if self.calls in self.lose:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "injected fault: response lost")
            return response

        return grpc.unary_unary_rpc_method_handler(
            behaviour,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


async def test_lost_responses_are_retried_and_the_tool_runs_once() -> None:
    runs: list[int] = []

    @mesh.tool(session_required=True)
    def bump(session: mesh.Session, n: int) -> int:
        runs.append(n)
        session.state["total"] = session.state.get("total", 0) + n
        return int(session.state["total"])

    fault = LoseResponses(lose={1, 4})  # the call that opens the session, and a later one
    async with running_agent(bump, interceptors=[fault]) as (agent, client):
        async with client.proxy("bump", session_required=True, retry_count=2, retry_delay=0) as p:
            assert [await p(n=n) for n in (1, 2, 3)] == [1, 3, 6]
        assert runs == [1, 2, 3]
        assert fault.calls == 5  # 3 calls + 2 retries
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
