"""``sessionmesh mcp``: the MCP front door. Any MCP client (Streamable HTTP, both protocol
eras: the SDK's transport serves them) lists the mesh's tools and calls them; a call in a
session lands on the replica that owns it, from any front door.

The front door keeps no per-session state: a session's handle is its mesh session id, and
the mesh routes it to its owner (following it when it moves). So any number of front doors
run behind any balancer. The SDK's transport runs stateless (no ``Mcp-Session-Id`` table).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any

import mcp_types as types
from mcp.server.lowlevel import NotificationOptions, Server
from mcp.server.transport_security import TransportSecuritySettings
from mcp.shared.exceptions import MCPError

from sessionmesh import tracing
from sessionmesh.errors import AgentUnavailable, MeshError, RemoteError
from sessionmesh.server._mcp_sessions import SignedSessions
from sessionmesh.server._mcp_tools import CLOSE_SESSION, SESSION, MeshTool, mesh_tools
from sessionmesh.v1 import registry_service_pb2 as rpb
from sessionmesh.wire.names import is_durable, short

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

    from mcp.server.context import ServerRequestContext

    from sessionmesh.client import MeshClient
    from sessionmesh.server._metrics import FrontDoorMetrics

log = logging.getLogger("sessionmesh.mcp")

#: Where a result's session handle also goes in its ``_meta``.
SESSION_META = "io.sessionmesh/session"
#: The ``_meta`` key of a tools/call's id: a retry with the same id never applies twice.
CALL_ID_META = "io.sessionmesh/callId"
#: How long a client may cache tools/list (2026-07-28 era): agents come and go.
TOOLS_TTL_MS = 5_000


#: Callers (bearer tokens) whose own connections to the mesh are kept open at once.
MAX_CALLERS = 64


class FrontDoor:
    """MCP requests in, mesh calls out. A request with a bearer token calls the agents with
    that token (its own connections), so the agents know the MCP caller, not the front door:
    its sessions are bound to it, and another caller presenting its handle gets what a
    forged handle gets. A request without one calls with the front door's credentials."""

    def __init__(
        self, client: MeshClient, connect: Callable[[str], MeshClient] | None = None
    ) -> None:
        self.client = client
        self._connect = connect
        self._callers: collections.OrderedDict[str, MeshClient] = collections.OrderedDict()
        #: Prometheus metrics, when the front door serves them (--metrics-port).
        self.metrics: FrontDoorMetrics | None = None
        #: Calls in flight by (Mcp-Session-Id, request id), for handshake-era cancels.
        self.in_flight: dict[tuple[str, str], asyncio.Task[Any]] | None = None
        self._tools: dict[str, MeshTool] | None = None
        self._tools_at = 0.0
        # First among the watch's listeners: a later one (watch_tools) sees fresh tools.
        client.watch.listeners.insert(0, self._forget_tools)

    async def _client_for(self, ctx: ServerRequestContext[Any]) -> MeshClient:
        request = ctx.request
        header = request.headers.get("authorization", "") if request is not None else ""
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if self._connect is None or scheme.lower() != "bearer" or not token:
            return self.client
        callers = self._callers
        client = callers.get(token)
        if client is not None:
            callers.move_to_end(token)
            return client
        client = callers[token] = self._connect(token)
        if len(callers) > MAX_CALLERS:
            _, oldest = callers.popitem(last=False)
            await oldest.aclose()
        with contextlib.suppress(MeshError):
            await client.ready(within=5.0)
        return client

    async def aclose(self) -> None:
        callers, self._callers = self._callers, collections.OrderedDict()
        for client in callers.values():
            await client.aclose()

    def watch_tools(self, changed: Callable[[], None]) -> None:
        """Call ``changed`` whenever the tools the front door lists change."""
        listed = [self._signature()]

        def on_change(*_: Any) -> None:
            now = self._signature()
            if now != listed[0]:
                listed[0] = now
                changed()

        self.client.watch.listeners.append(on_change)

    def _signature(self) -> str:
        return repr(sorted((t.name, repr(t.input_schema)) for t in self.tools().values()))

    def tools(self) -> dict[str, MeshTool]:
        """The tools, made again after the registry's view changed, or every few seconds
        (a reconnected view is replaced without a word per instance), not per call."""
        now = time.monotonic()
        if self._tools is None or now - self._tools_at > TOOLS_TTL_MS / 1000:
            serving = [i for i in self.client.instances() if i.state == rpb.INSTANCE_STATE_SERVING]
            self._tools, self._tools_at = mesh_tools(serving), now
        return self._tools

    def _forget_tools(self, *_: Any) -> None:
        self._tools = None

    async def list_tools(
        self, ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        return types.ListToolsResult(
            tools=[
                types.Tool(
                    name=t.name,
                    description=t.description,
                    input_schema=t.input_schema,
                    output_schema=t.output_schema,
                )
                for t in self.tools().values()
            ],
            ttl_ms=TOOLS_TTL_MS,
        )

    async def call_tool(
        self, ctx: ServerRequestContext[Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        tool = self.tools().get(params.name)
        if tool is None:
            raise MCPError(
                types.INVALID_PARAMS,
                f"unknown tool {params.name!r}: tools/list names the mesh's tools",
            )
        arguments = dict(params.arguments or {})
        handle = arguments.pop(SESSION, None)
        request = ctx.request
        carrier = (
            {k: request.headers[k] for k in ("traceparent", "tracestate") if k in request.headers}
            if request is not None and tracing.tracer() is not None
            else None
        )
        attributes = {"mcp.method.name": "tools/call", "gen_ai.tool.name": params.name}
        if isinstance(handle, str):
            attributes["mcp.session.id"] = short(handle)  # the handle is a secret: shortened
        began = time.perf_counter()
        with tracing.span(f"tools/call {params.name}", carrier, attributes, server=True):
            result = await self._cancellable(ctx, self._call(ctx, tool, arguments, handle))
        if self.metrics is not None:
            outcome = result.structured_content.get("reason", "?") if result.is_error else "ok"
            self.metrics.done(tool.name, str(outcome).lower(), time.perf_counter() - began)
        return result

    async def _cancellable(
        self, ctx: ServerRequestContext[Any], call: Coroutine[Any, Any, types.CallToolResult]
    ) -> types.CallToolResult:
        """Run the call in a task a handshake-era ``notifications/cancelled`` can find by
        the client's session and request ids (the mesh call is then cancelled too)."""
        request = ctx.request
        presented = request.headers.get("mcp-session-id") if request is not None else None
        if self.in_flight is None or presented is None or ctx.request_id is None:
            return await call
        key = (presented, str(ctx.request_id))
        task = asyncio.ensure_future(call)
        self.in_flight[key] = task
        try:
            await asyncio.wait([task])
        except asyncio.CancelledError:
            task.cancel()  # the request itself was cancelled: so is its mesh call
            raise
        finally:
            self.in_flight.pop(key, None)
        if task.cancelled():
            return _failed("CANCELLED", "the client cancelled the call")
        return task.result()

    async def _call(
        self,
        ctx: ServerRequestContext[Any],
        tool: MeshTool,
        arguments: dict[str, Any],
        handle: Any,
    ) -> types.CallToolResult:
        client = await self._client_for(ctx)
        if handle is not None and not isinstance(handle, str):
            return _failed("INVALID_ARGUMENTS", "'session' is a handle: a string")
        if tool.name == CLOSE_SESSION:
            if not handle:
                return _failed("INVALID_ARGUMENTS", "close_session needs 'session'")
            try:
                return _result({"closed": await _close(client, handle)}, None)
            except MeshError as exc:
                return _error(exc)
        proxy = client.proxy(tool.capability, session_required=tool.session_required)
        try:
            call_id = (ctx.meta or {}).get(CALL_ID_META)
            if tool.streaming:
                value = await self._stream(ctx, proxy, tool, arguments, handle)
            elif isinstance(call_id, str) and call_id:
                # A retried tools/call carries the same id: answered, never applied twice.
                value = await proxy.call_once(call_id, session_id=handle or None, **arguments)
            elif handle:
                value = await proxy.call_with_session(session_id=handle, **arguments)
            else:
                value = await proxy(**arguments)
        except MeshError as exc:
            # A session this call opened before it failed is the caller's too: say which.
            return _error(exc, handle or proxy.detach_session())
        # The auto session opened by this call is the caller's now: it closes it
        # (close_session) or its idle TTL does.
        return _result(value, handle or proxy.detach_session())

    async def _stream(
        self,
        ctx: ServerRequestContext[Any],
        proxy: Any,
        tool: MeshTool,
        arguments: dict[str, Any],
        handle: str | None,
    ) -> dict[str, Any]:
        chunks: list[Any] = []
        async for chunk in proxy.call_tool_auto(tool.capability, arguments, session_id=handle):
            chunks.append(chunk)
            # To the request's own stream, if the client asked for progress (a token).
            await ctx.session.report_progress(len(chunks), message=json.dumps(chunk))
        return {"chunks": chunks}


async def _close(client: MeshClient, handle: str) -> bool:
    """Close a session where it lives. A durable one whose first owner is gone is closed
    in its store by any replica of its agent; which agent that was, a handle does not say,
    so one serving instance of each agent is asked until one closes it."""
    try:
        if await client.proxy("-").close_session(handle):
            return True
    except AgentUnavailable:
        if not is_durable(handle):
            raise
    if not is_durable(handle):
        return False
    asked: set[str] = set()
    for instance in client.instances():
        if instance.state != rpb.INSTANCE_STATE_SERVING or instance.agent_name in asked:
            continue
        asked.add(instance.agent_name)
        async with client.agent(instance) as agent:
            if await agent.proxy("-").close_session(handle):
                return True
    return False


def _result(value: Any, handle: str | None) -> types.CallToolResult:
    structured = dict(value) if isinstance(value, dict) else {"result": value}
    if handle:
        structured[SESSION] = handle
    return types.CallToolResult(
        content=[types.TextContent(text=json.dumps(structured))],
        structured_content=structured,
        _meta={SESSION_META: handle} if handle else None,
    )


def _error(exc: MeshError, handle: str | None = None) -> types.CallToolResult:
    if isinstance(exc, RemoteError):
        return _failed(exc.reason or exc.code.name, exc.message, handle)
    return _failed(type(exc).__name__, str(exc), handle)


def _failed(reason: str, message: str, handle: str | None = None) -> types.CallToolResult:
    structured = {"reason": reason, "message": message}
    if handle:
        structured[SESSION] = handle
    return types.CallToolResult(
        content=[types.TextContent(text=f"{reason}: {message}")],
        structured_content=structured,
        is_error=True,
    )


def app(
    front: FrontDoor, host: str, port: int, origins: list[str], session_key: bytes | None = None
) -> SignedSessions:
    """The front door's ASGI app: MCP's Streamable HTTP transport at ``/mcp``, handing
    handshake-era clients a signed ``Mcp-Session-Id`` (``session_key``: shared by front
    doors that serve one balancer; by default one of this process's own)."""
    server: Server[Any] = _MeshServer(
        "sessionmesh",
        description="The tools of a sessionmesh mesh; a call with a session handle lands on "
        "the replica that holds the session.",
        on_list_tools=front.list_tools,
        on_call_tool=front.call_tool,
    )
    local = (host, "localhost", "127.0.0.1")
    security = TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=[f"{host}:*", f"{host}", "localhost:*", "127.0.0.1:*"],
        allowed_origins=origins
        or [f"{scheme}://{name}:*" for scheme in ("http", "https") for name in local],
    )
    starlette = server.streamable_http_app(
        stateless_http=True, transport_security=security, host=host
    )
    signed = SignedSessions(starlette, session_key or secrets.token_bytes(32))
    front.in_flight = signed.in_flight
    front.watch_tools(signed.tools_changed)
    return signed


class _MeshServer(Server[Any]):
    """The SDK's server, saying in the handshake that its tool list changes (agents come
    and go): handshake-era clients hear it on their GET stream."""

    def create_initialization_options(self, *args: Any, **kwargs: Any) -> Any:
        if not args and "notification_options" not in kwargs:
            kwargs["notification_options"] = NotificationOptions(tools_changed=True)
        return super().create_initialization_options(*args, **kwargs)
