"""The client side of the ``sessionmesh`` command: ``list``, ``call`` and ``sessions``.

They only read the registry and call agents; serving, the registry and ``run`` live with
the server, whose parser adds these commands (``add``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from sessionmesh.client._cli_sessions import sessions_command, sessions_options
from sessionmesh.client._client import AgentClient, MeshClient, connect, tool_info
from sessionmesh.core.cli import (
    DEFAULT_REGISTRY_PORT,
    REGISTRY_ENV,
    registry_address,
    say,
    security_options,
    tls_from,
    token_from,
)
from sessionmesh.errors import MeshError, UsageError
from sessionmesh.v1 import registry_service_pb2 as rpb

COMMANDS = ("list", "call", "sessions", "open", "close", "top")

__all__ = ["COMMANDS", "add"]


async def _mesh(args: argparse.Namespace) -> MeshClient:
    address = registry_address(args, required=True)
    assert address is not None
    client = connect(registry=address, tls=tls_from(args), token=token_from(args))
    try:
        await client.ready(within=args.wait)
    except MeshError:
        await client.aclose()
        raise
    return client


def _state(instance: rpb.Instance) -> str:
    return rpb.InstanceState.Name(instance.state).removeprefix("INSTANCE_STATE_").lower()


async def _list(args: argparse.Namespace) -> int:
    client = await _mesh(args)
    try:
        instances = sorted(client.instances(), key=lambda i: (i.agent_name, i.endpoint))
    finally:
        await client.aclose()
    rows: list[dict[str, Any]] = [
        {
            "agent": i.agent_name,
            "instance": i.instance_id,
            "endpoint": i.endpoint,
            "state": _state(i),
            "open_sessions": i.open_sessions,
            "capabilities": sorted({t.capability for t in i.tools}),
            **({"tools": [tool_info(t) for t in i.tools]} if args.tools else {}),
        }
        for i in instances
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no agents registered")
        return 0
    header = ("AGENT", "INSTANCE", "ENDPOINT", "STATE", "SESSIONS", "CAPABILITIES")
    table = [
        (r["agent"], r["instance"], r["endpoint"], r["state"], str(r["open_sessions"]))
        for r in rows
    ]
    widths = [max(len(cell) for cell in column) for column in zip(header, *table, strict=False)]

    def line(cells: tuple[str, ...], caps: str) -> str:
        padded = [
            c.rjust(w) if i == 4 else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=False))
        ]
        return "  ".join([*padded, caps]).rstrip()

    print(line(header[:5], header[5]))
    for r, cells in zip(rows, table, strict=True):
        print(line(cells, ", ".join(r["capabilities"])))
        for t in r.get("tools", ()):
            print(f"    {_signature(t)}")
    return 0


_PYTHON = {
    "integer": "int",
    "number": "float",
    "string": "str",
    "boolean": "bool",
    "null": "None",
    "object": "dict",
    "array": "list",
}


def _kind(schema: dict[str, Any]) -> str:
    """A JSON schema as the Python type a caller writes: ``list[str]``, ``int | None``."""
    if "enum" in schema:
        return " | ".join(json.dumps(v) for v in schema["enum"])
    if "const" in schema:
        return json.dumps(schema["const"])
    if "anyOf" in schema or "oneOf" in schema:
        return " | ".join(_kind(s) for s in schema.get("anyOf") or schema["oneOf"])
    if "$ref" in schema:
        return str(schema["$ref"]).rpartition("/")[2]
    if "title" in schema and schema.get("type") == "object" and "properties" in schema:
        return str(schema["title"])
    kind = schema.get("type")
    if isinstance(kind, list):
        return " | ".join(_PYTHON.get(str(k), str(k)) for k in kind)
    if kind == "array":
        items = schema.get("items")
        return f"list[{_kind(items)}]" if isinstance(items, dict) and items else "list"
    if kind == "object" and isinstance(schema.get("additionalProperties"), dict):
        return f"dict[str, {_kind(schema['additionalProperties'])}]"
    return _PYTHON.get(str(kind), "Any") if kind else "Any"


def _whole(value: Any) -> Any:
    """JSON numbers come back from a Struct as floats: 1.0 is shown as 1."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _literal(value: Any) -> str:
    """A default as Python writes it: None, True, 1 (not null, true, 1.0)."""
    if value is None or isinstance(value, bool):
        return repr(value)
    return json.dumps(_whole(value))


def _signature(tool: dict[str, Any]) -> str:
    """``name(a: int = 1, b: list[str]) -> int  [capability, session, stream]``, for a
    person: parameters in the function's own order (the agent sends it: ``x-order``)."""
    parameters = tool["parameters"]
    props = parameters.get("properties", {})
    required = set(parameters.get("required", ()))
    order = [n for n in parameters.get("x-order", ()) if n in props]
    order += sorted(set(props) - set(order))
    params = []
    for name in order:
        schema = props[name]
        default = "" if name in required else f" = {_literal(schema.get('default'))}"
        params.append(f"{name}: {_kind(schema)}{default}")
    output = tool.get("output") or {}
    returns = f" -> {_kind(output)}" if output else ""
    marks = [tool["capability"]] if tool["capability"] != tool["name"] else []
    marks += [
        m for m, on in (("session", tool["session_required"]), ("stream", tool["streaming"])) if on
    ]
    signature = f"{tool['name']}({', '.join(params)}){returns}"
    return signature + (f"  [{', '.join(marks)}]" if marks else "")


def _arguments(text: str | None) -> dict[str, Any]:
    """The call's arguments: a JSON object, ``-`` to read it from stdin, ``@FILE`` from a
    file."""
    if text == "-":
        text = sys.stdin.read()
    elif text is not None and text.startswith("@"):
        try:
            text = Path(text[1:]).read_text()
        except OSError as exc:
            raise UsageError(f"cannot read the arguments from {text[1:]}: {exc}") from None
    try:
        arguments = json.loads(text) if text and text.strip() else {}
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"the arguments are not JSON ({exc}): pass an object like '{{\"n\": 1}}'"
        ) from None
    if not isinstance(arguments, dict):
        raise UsageError("the arguments must be a JSON object, like '{\"n\": 1}'")
    return arguments


def _print(value: Any, *, indent: int | None = 2) -> None:
    print(json.dumps(value, indent=indent, sort_keys=True), flush=True)


async def _call(args: argparse.Namespace) -> int:
    arguments = _arguments(args.arguments)
    client: AgentClient | MeshClient
    if args.agent:  # one agent, no registry
        client = connect(args.agent, tls=tls_from(args), token=token_from(args))
        try:
            tools = await client.list_tools()
        except MeshError:
            await client.aclose()
            raise
    else:
        client = await _mesh(args)
        tools = [tool_info(t) for i in client.instances() for t in i.tools]
    try:
        found = [t for t in tools if args.capability in (t["name"], t["capability"])]
        if not found:
            where = args.agent or "the mesh"
            raise UsageError(
                f"no live provider of {args.capability!r} in {where}: see `sessionmesh list"
                + (f" --agent {args.agent}`" if args.agent else "`")
            )
        tool = found[0]
        proxy = client.proxy(
            args.capability, session_required=tool["session_required"], timeout=args.timeout
        )
        if args.session:  # a session opened with `sessionmesh open`: it stays open
            if tool["streaming"]:
                chunks = proxy.call_tool_auto(args.capability, arguments, session_id=args.session)
                async with chunks:
                    async for chunk in chunks:
                        _print(chunk, indent=None)
            else:
                _print(
                    await proxy.call_with_session(
                        args.capability, arguments, session_id=args.session
                    )
                )
            return 0
        async with proxy:
            if tool["streaming"]:
                async with proxy.call_tool_auto(args.capability, arguments) as chunks:
                    async for chunk in chunks:
                        _print(chunk, indent=None)
            else:
                _print(await proxy(args.capability, arguments))
    finally:
        await client.aclose()
    return 0


async def _open(args: argparse.Namespace) -> int:
    client = await _mesh(args)
    try:
        print(await client.proxy(args.capability).create_session())
    finally:
        await client.aclose()
    return 0


async def _close(args: argparse.Namespace) -> int:
    client = await _mesh(args)
    try:
        closed = await client.proxy("-").close_session(args.session_id)
    finally:
        await client.aclose()
    if not closed:
        say("no such open session (closed, expired, or never opened)")
        return 1
    return 0


async def _top(args: argparse.Namespace) -> int:
    try:
        from rich.console import Console
        from rich.live import Live
        from rich.table import Table
    except ImportError:
        raise UsageError("top needs rich: pip install 'sessionmesh[top]'") from None
    client = await _mesh(args)
    agents: dict[str, Any] = {}
    seen: dict[str, tuple[float, int]] = {}  # instance -> (when, calls served then)
    loop = asyncio.get_running_loop()
    try:
        with Live(console=Console(), auto_refresh=False) as live:
            shown = 0
            while args.count is None or shown < args.count:
                table = Table(title=f"sessionmesh top: {client.registry}", title_justify="left")
                for column in ("AGENT", "INSTANCE", "ENDPOINT", "STATE", "SESSIONS"):
                    table.add_column(column)
                table.add_column("CALLS/S", justify="right")
                table.add_column("CALLS", justify="right")
                live_ids = set()
                for i in sorted(client.instances(), key=lambda i: (i.agent_name, i.endpoint)):
                    live_ids.add(i.instance_id)
                    agent = agents.get(i.instance_id)
                    if agent is None:
                        agent = agents[i.instance_id] = client.agent(i)
                    rate = calls = "-"
                    try:
                        served = (await asyncio.wait_for(agent.list_sessions(), 2)).calls_served
                    except (MeshError, TimeoutError):
                        pass
                    else:
                        now = loop.time()
                        then, before = seen.get(i.instance_id, (now, served))
                        seen[i.instance_id] = (now, served)
                        calls = str(served)
                        rate = f"{(served - before) / (now - then):.0f}" if now > then else "-"
                    row = (i.agent_name, i.instance_id, i.endpoint, _state(i), str(i.open_sessions))
                    table.add_row(*row, rate, calls)
                for gone in set(agents) - live_ids:
                    await agents.pop(gone).aclose()
                live.update(table, refresh=True)
                shown += 1
                if args.count is None or shown < args.count:
                    await asyncio.sleep(args.interval)  # the refresh period, not a wait for state
    finally:
        for agent in agents.values():
            await agent.aclose()
        await client.aclose()
    return 0


def add(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``list``, ``call`` and ``sessions`` to the ``sessionmesh`` parser."""

    def registry_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--registry",
            default=None,
            metavar="HOST:PORT",
            help=f"the registry (default: ${REGISTRY_ENV}, else 127.0.0.1:{DEFAULT_REGISTRY_PORT})",
        )

    listing = commands.add_parser(
        "list", help="agents, instances, capabilities, state, open sessions"
    )
    registry_option(listing)
    listing.add_argument("--json", action="store_true")
    listing.add_argument(
        "--tools", action="store_true", help="each instance's tools, with their parameters"
    )
    listing.set_defaults(run=_list)

    call = commands.add_parser(
        "call", help="call a capability; print the result (or chunks) as JSON"
    )
    registry_option(call)
    call.add_argument("capability")
    call.add_argument(
        "arguments",
        nargs="?",
        default=None,
        help="a JSON object; - reads it from stdin, @FILE from a file",
    )
    call.add_argument(
        "--agent",
        default=None,
        metavar="HOST:PORT",
        help="call this agent directly, with no registry",
    )
    call.add_argument("--timeout", type=float, default=None, help="seconds")
    call.add_argument(
        "--session",
        default=None,
        metavar="ID",
        help="call (or stream) inside this session (from `sessionmesh open`), which stays open",
    )
    call.set_defaults(run=_call)

    opening = commands.add_parser(
        "open", help="open a session on a provider of CAPABILITY; print its id (a secret)"
    )
    registry_option(opening)
    opening.add_argument("capability")
    opening.set_defaults(run=_open)

    closing = commands.add_parser("close", help="close a session opened with `open`")
    registry_option(closing)
    closing.add_argument("session_id", metavar="SESSION_ID")
    closing.set_defaults(run=_close)

    sessions = commands.add_parser(
        "sessions",
        help="open sessions per instance (ids shortened); `sessions move` moves them",
        usage="sessionmesh sessions [AGENT] [--json]\n"
        "       sessionmesh sessions move AGENT --to INSTANCE [--count N | --session ID]",
    )
    registry_option(sessions)
    sessions_options(sessions)
    sessions.set_defaults(run=lambda args: sessions_command(args, _mesh))

    top = commands.add_parser(
        "top", help="a live view of the mesh: instances, state, sessions, calls/s (Ctrl-C ends)"
    )
    registry_option(top)
    top.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    top.add_argument("--count", type=int, default=None, help=argparse.SUPPRESS)
    top.set_defaults(run=_top)

    for p in (listing, call, sessions, opening, closing, top):
        p.add_argument("--wait", type=float, default=5.0, help=argparse.SUPPRESS)
        security_options(p, serves=False)
