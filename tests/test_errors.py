"""Bad input gets a clear status, an ErrorInfo reason and a typed error."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from sessionmesh import mesh
from sessionmesh.client._status import from_rpc_error
from sessionmesh.errors import (
    AgentUnavailable,
    CallTimeout,
    Code,
    InvalidArguments,
    RemoteError,
    ResourceExhausted,
    SessionNotFound,
    ToolFailed,
    ToolNotFound,
    ToolTimeout,
    UsageError,
)
from sessionmesh.testing import eventually, running_agent
from sessionmesh.v1 import session_service_pb2 as pb
from sessionmesh.v1 import session_service_pb2_grpc as pb_grpc
from tests.procs import ROOT
from tests.tools import add, echo, fail, increment, not_json, overrun, wait_forever

pytestmark = pytest.mark.anyio


async def test_unknown_tool_lists_the_known_ones() -> None:
    async with running_agent(add, echo) as (_, client):
        with pytest.raises(ToolNotFound, match=r"no tool .nope.*add, echo") as info:
            await client.proxy("nope")()
        assert info.value.code == Code.NOT_FOUND
        assert info.value.reason == "TOOL_NOT_FOUND"


async def test_unknown_session_id() -> None:
    async with running_agent(increment) as (agent, client):
        forged = agent.instance_id + ".AAAAAAAAAAAAAAAAAAAAAA"
        with pytest.raises(SessionNotFound) as info:
            await client.proxy("increment").call_with_session(session_id=forged)
        assert info.value.code == Code.NOT_FOUND
        assert info.value.session_id == forged
        assert len(agent.sessions) == 0  # nothing was opened in its place


@pytest.mark.parametrize(
    ("args", "field", "text"),
    [
        ({"a": "one"}, "a", "argument 'a' must be int, got str 'one'"),
        ({"a": 1.5}, "a", "must be int, got float"),
        ({"a": True}, "a", "must be int, got bool"),
        ({}, "a", "missing argument 'a'"),
        ({"a": 1, "c": 2}, "c", "unknown argument 'c'.*expected: a, b, tags"),
        ({"a": 1, "tags": ["x", 2]}, "tags[1]", r"'tags\[1\]' must be str"),
        ({"a": 1, "tags": "x"}, "tags", "must be a list, got str"),
    ],
)
async def test_invalid_arguments_name_the_parameter(
    args: dict[str, object], field: str, text: str
) -> None:
    async with running_agent(add) as (_, client):
        with pytest.raises(InvalidArguments, match=text) as info:
            await client.proxy("add")(**args)
        assert info.value.field == field
        assert info.value.code == Code.INVALID_ARGUMENT


async def test_arguments_are_coerced_as_json_numbers() -> None:
    async with running_agent(add) as (_, client):
        assert await client.proxy("add")(a=1, b=2) == 3  # int accepted where float is declared
        assert await client.proxy("add")(a=2, tags=["x"]) == 3.5


async def test_tool_failure_carries_remote_type_and_message_without_traceback() -> None:
    async with running_agent(fail) as (_, client):
        with pytest.raises(ToolFailed, match="raised ValueError: boom") as info:
            await client.proxy("fail")(message="boom")
        assert info.value.remote_type == "ValueError"
        assert info.value.remote_message == "boom"
        assert info.value.debug == ""


async def test_debug_agents_send_the_traceback() -> None:
    async with running_agent(fail, debug=True) as (_, client):
        with pytest.raises(ToolFailed) as info:
            await client.proxy("fail")(message="boom")
        assert "Traceback" in info.value.debug
        assert "raise ValueError(message)" in info.value.debug


async def test_a_result_with_no_json_form_is_a_clear_failure() -> None:
    async with running_agent(not_json) as (_, client):
        with pytest.raises(ToolFailed, match=r"\$\.a is a set") as info:
            await client.proxy("not_json")()
        assert info.value.remote_type == "NotJsonLike"


async def test_arguments_with_no_json_form_are_refused_locally() -> None:
    async with running_agent(echo) as (_, client):
        with pytest.raises(UsageError, match="value is a object"):
            await client.proxy("echo")(value=object())


async def test_oversize_message_gets_resource_exhausted() -> None:
    async with running_agent(echo, max_message_bytes=64 * 1024) as (_, client):
        with pytest.raises(ResourceExhausted) as info:
            await client.proxy("echo")(value="x" * 100_000)
        assert info.value.code == Code.RESOURCE_EXHAUSTED
        assert await client.proxy("echo")(value="small") == "small"


async def test_tool_timeout_and_call_deadline() -> None:
    async with running_agent(overrun, wait_forever) as (_, client):
        with pytest.raises(ToolTimeout, match=r"ran past its timeout of 0.2 s"):
            await client.proxy("overrun")()
        with pytest.raises(CallTimeout):
            await client.proxy("wait_forever", timeout=0.2)()


class _Mute(pb_grpc.SessionServiceServicer):
    """An agent that takes calls and never answers (frozen, say)."""

    async def Exchange(  # type: ignore[override]
        self,
        request_iterator: AsyncIterator[pb.ExchangeRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        async for _ in request_iterator:
            pass


async def test_a_call_to_an_agent_that_never_answers_ends_at_its_timeout() -> None:
    server = grpc.aio.server()
    pb_grpc.add_SessionServiceServicer_to_server(_Mute(), server)  # type: ignore[abstract]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with asyncio.timeout(10), mesh.connect(f"127.0.0.1:{port}") as client:
            proxy = client.proxy("anything", timeout=0.1)
            with pytest.raises(CallTimeout, match=r"no answer within 0\.1 s"):
                await proxy()
            with pytest.raises(CallTimeout):  # the stream is still usable, the timer per call
                await proxy()
    finally:
        await server.stop(0)


async def test_bad_proxy_options_are_usage_errors() -> None:
    async with running_agent(echo) as (_, client):
        with pytest.raises(UsageError, match="retry_count"):
            client.proxy("echo", retry_count=-1)
        with pytest.raises(UsageError, match="unknown proxy option"):
            client.proxy("echo", retries=3)
        with pytest.raises(UsageError, match="timeout"):
            client.proxy("echo").options(timeout=0)
    with pytest.raises(UsageError, match="closed"):
        client.proxy("echo")


async def test_raw_stream_protocol_errors() -> None:
    async with running_agent(echo) as (agent, _):
        channel = grpc.aio.insecure_channel(agent.address)
        stub = pb_grpc.SessionServiceStub(channel)
        call = stub.StreamCall()
        await call.write(pb.StreamCallRequest(credit=1))
        await call.done_writing()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call.read()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "first message" in (info.value.details() or "")
        await channel.close()


def test_bad_tool_declarations_fail_at_import_time() -> None:
    with pytest.raises(UsageError, match="buffer_size"):
        mesh.tool(buffer_size=0)
    with pytest.raises(UsageError, match="retry_count, auto_session_management configure"):
        mesh.tool(retry_count=3, auto_session_management=False)
    with pytest.raises(UsageError, match="dependency"):
        mesh.tool(dependencies=[{"tags": ["x"]}])


def test_two_tools_with_one_name_are_refused() -> None:
    @mesh.tool(capability="echo")
    def other() -> None:
        return None

    with pytest.raises(UsageError, match="two tools answer to 'echo'"):
        mesh.Agent([echo, other])


def test_a_status_grpc_makes_up_for_a_failed_write_is_a_broken_connection() -> None:
    # When a write fails (the agent died mid-stream), grpc.aio replaces the call's status
    # with this INTERNAL of its own; a read then raises it. The agent never said so.
    made_up = grpc.aio.AioRpcError(
        grpc.StatusCode.INTERNAL,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(),
        details="Internal error from Core",
        debug_error_string='Failed "execute_batch": (<SendMessageOperation>,)',
    )
    assert isinstance(from_rpc_error(made_up), AgentUnavailable)
    said = grpc.aio.AioRpcError(
        grpc.StatusCode.INTERNAL, grpc.aio.Metadata(), grpc.aio.Metadata(), details="bad state"
    )
    error = from_rpc_error(said)  # an INTERNAL the agent sent stays what it is
    assert type(error) is RemoteError and error.code == Code.INTERNAL


async def test_an_agent_that_cannot_listen_says_why_and_leaves_nothing_running(
    reg: str,
) -> None:
    async with running_agent(echo) as (first, _):
        threads, tasks = set(threading.enumerate()), asyncio.all_tasks()
        second = mesh.Agent([echo], port=first.port, registry=reg, metrics_port=0)
        with pytest.raises(
            UsageError, match=rf"listen on 127\.0\.0\.1:{first.port}: the port is in use"
        ):
            await second.start()
        # Its metrics server (a thread) and mesh client (tasks) were started before the
        # bind failed: they are gone, and the agent starts anew once given a free port.
        await eventually(lambda: set(threading.enumerate()) <= threads, what="no thread left")
        await eventually(lambda: asyncio.all_tasks() <= tasks, what="no task left")
        second.port = 0
        await second.start()
        try:
            async with mesh.connect(second.address) as client:
                assert await client.proxy("echo")(value=1) == 1
        finally:
            await second.stop()


def test_error_hierarchy() -> None:
    assert issubclass(ToolTimeout, ToolFailed) and issubclass(ToolTimeout, CallTimeout)
    assert issubclass(SessionNotFound, RemoteError)


async def test_a_first_call_that_cannot_run_leaves_no_session() -> None:
    async with running_agent(increment) as (agent, client):
        async with client.proxy("session_counter", session_required=True) as counter:
            with pytest.raises(InvalidArguments):
                await counter(increment="x")
            assert counter.session_id is None
            assert len(agent.sessions) == 0
            assert await counter(increment=2) == 2  # the next call opens one


async def test_a_proxy_of_a_closed_client_refuses_calls() -> None:
    async with running_agent(echo, increment) as (agent, client):
        plain = client.proxy("echo")
        counter = client.proxy("session_counter", session_required=True)
        async with counter:
            assert await counter(increment=1) == 1
            await client.aclose()
            with pytest.raises(UsageError, match="closed"):
                await plain(value=1)
            with pytest.raises(UsageError, match="closed"):
                await counter(increment=1)
        # Closing the client closed the session its proxy had open.
        assert len(agent.sessions) == 0


@pytest.mark.parametrize("scheme", ["", "http://", "grpc://"])
async def test_connect_takes_the_design_notes_http_urls(scheme: str) -> None:
    async with running_agent(echo) as (agent, _):
        async with mesh.connect(f"{scheme}{agent.address}") as client:
            assert await client.proxy("echo")(value=1) == 1


@pytest.mark.parametrize(
    ("address", "says"),
    [
        ("http://127.0.0.1:1", None),  # with tls= (below): a contradiction
        ("ftp://127.0.0.1:1", "use host:port"),
        ("http://127.0.0.1", "give a host and a port"),
    ],
)
def test_connect_refuses_what_it_cannot_use(address: str, says: str | None) -> None:
    if says is None:
        with pytest.raises(UsageError, match="plaintext URL but tls= is given"):
            mesh.connect(address, tls=mesh.TLS())
        return
    with pytest.raises(UsageError, match=says):
        mesh.connect(address)


def test_retries_back_off_exponentially_with_jitter_and_a_cap() -> None:
    from sessionmesh.client._reroute import MAX_RETRY_DELAY, backoff

    for attempt in range(1, 12):
        ceiling = min(MAX_RETRY_DELAY, 0.5 * 2 ** (attempt - 1))
        waits = [backoff(0.5, attempt) for _ in range(50)]
        assert all(0 <= w <= ceiling for w in waits)
        assert len(set(waits)) > 1  # jitter: callers failing together do not retry in step
    assert max(backoff(0.5, 30) for _ in range(200)) > MAX_RETRY_DELAY / 2  # capped, not 0


async def test_a_tool_that_raises_is_logged_on_the_agent_with_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with running_agent(fail, increment) as (_, client):
        with caplog.at_level(logging.WARNING, logger="sessionmesh.agent"):
            with pytest.raises(ToolFailed):
                await client.proxy("fail")(message="boom")
    [record] = [r for r in caplog.records if r.name == "sessionmesh.agent"]
    assert record.getMessage() == "tool fail raised ValueError (no session)"
    assert record.exc_info is not None and str(record.exc_info[1]) == "boom"


async def test_the_tool_name_form_says_which_form_was_taken() -> None:
    async with running_agent(increment) as (_, client):
        counter = client.proxy("session_counter", session_required=True)
        with pytest.raises(ToolNotFound, match=r"proxy\('amount', \{\.\.\.\}\) calls the agent's"):
            await counter("amount", {"x": 1})
        await counter.cleanup_auto_session()


def test_a_proxy_called_without_await_and_no_loop_fails_at_once() -> None:
    # In a process of its own: grpc delivers a closed loop's late events through the loops
    # still open, and the one of this test session would raise "Event loop is closed".
    code = """
import asyncio
from sessionmesh import mesh
from sessionmesh.errors import UsageError
from sessionmesh.testing import eventually, running_agent
from tests.tools import increment

async def made_in_a_loop() -> mesh.Proxy:
    async with running_agent(increment) as (_, client):
        return client.proxy("session_counter", session_required=True)

proxy = asyncio.run(made_in_a_loop())
try:
    proxy(increment=1)  # no loop here: refused at once, not a never-awaited warning
except UsageError as refused:
    print(refused)
"""
    out = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert "event loop is not running: call it with `await`" in out.stdout, out.stderr
    assert "never awaited" not in out.stderr


@pytest.mark.parametrize("bad", ["garbage", "abc.def", "a" * 100])
async def test_a_malformed_session_id_is_called_malformed(bad: str) -> None:
    # It used to be "instance garbage is gone" (the client) or "not open on this agent".
    async with running_agent(increment) as (agent, client):
        proxy = client.proxy("session_counter")
        with pytest.raises(InvalidArguments, match="is not a session id") as info:
            await proxy.call_with_session(session_id=bad, increment=1)
        assert info.value.field == "session_id"
        with pytest.raises(InvalidArguments, match="is not a session id"):
            await proxy.close_session(bad)
        async with grpc.aio.insecure_channel(agent.address) as channel:
            stub = pb_grpc.SessionServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as raw:
                await stub.Call(pb.CallRequest(tool="increment"), metadata=(("x-session-id", bad),))
            error = from_rpc_error(raw.value)
            assert isinstance(error, InvalidArguments) and error.field == "x-session-id"
            assert "is not a session id" in error.message
