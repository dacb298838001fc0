"""The mesh's tools as MCP tools: names, schemas, the ``session`` handle parameter.

A tool is listed under its capability (what the mesh calls it by). When agents of different
names offer the same capability with different schemas, each is listed as
``<agent>.<capability>`` (the first agent by name keeps the bare name too), so a name
always means one schema. A ``session_required`` tool takes one more parameter, ``session``
(the handle of a mesh session), marked ``x-mcp-header: Session`` so that it also travels as
the ``Mcp-Param-Session`` header a balancer can see.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import TYPE_CHECKING, Any

from sessionmesh.wire.codec import from_struct

if TYPE_CHECKING:
    from collections.abc import Iterable

    from sessionmesh.v1 import registry_service_pb2 as rpb

#: The parameter that carries a session handle.
SESSION = "session"
#: The tool that closes a session by its handle.
CLOSE_SESSION = "close_session"

SESSION_PARAMETER: dict[str, Any] = {
    "type": "string",
    "description": "The session to call in: the handle a first call without it returned "
    "(structuredContent.session). Leave it out to open a new session with this call.",
    "x-mcp-header": "Session",
}


@dataclasses.dataclass(frozen=True, slots=True)
class MeshTool:
    """One MCP tool and where its calls go."""

    name: str
    capability: str
    agent: str
    description: str
    input_schema: dict[str, Any]
    output_schema: dict[str, Any] | None
    session_required: bool
    streaming: bool


def close_session_tool() -> MeshTool:
    return MeshTool(
        name=CLOSE_SESSION,
        capability="",
        agent="",
        description="Close a mesh session by its handle: its state is dropped on the replica "
        "that holds it. Closing a closed or unknown session is not an error (closed: false).",
        input_schema={
            "type": "object",
            "properties": {SESSION: {**SESSION_PARAMETER, "description": "The handle to close."}},
            "required": [SESSION],
        },
        output_schema={
            "type": "object",
            "properties": {"closed": {"type": "boolean"}},
            "required": ["closed"],
        },
        session_required=False,
        streaming=False,
    )


def mesh_tools(instances: Iterable[rpb.Instance]) -> dict[str, MeshTool]:
    """Every tool of the serving instances, by MCP name (see the module's docstring)."""
    by_capability: dict[str, dict[str, MeshTool]] = {}
    for instance in sorted(instances, key=lambda i: i.agent_name):
        for described in instance.tools:
            capability = described.capability or described.name
            offers = by_capability.setdefault(capability, {})
            if instance.agent_name not in offers:
                offers[instance.agent_name] = _tool(instance.agent_name, capability, described)
    tools: dict[str, MeshTool] = {CLOSE_SESSION: close_session_tool()}
    for capability, offers in sorted(by_capability.items()):
        first = next(iter(offers.values()))
        if capability not in tools:
            tools[capability] = first
        if len({repr(t.input_schema) for t in offers.values()}) > 1:
            for agent, tool in offers.items():
                name = f"{agent}.{capability}"
                tools[name] = dataclasses.replace(tool, name=name)
    return tools


def _tool(agent: str, capability: str, tool: Any) -> MeshTool:
    schema = copy.deepcopy(from_struct(tool.parameters_schema)) or {"type": "object"}
    schema.setdefault("type", "object")
    if tool.session_required:
        schema.setdefault("properties", {})[SESSION] = dict(SESSION_PARAMETER)
    output = from_struct(tool.output_schema) or None
    if output is not None and output.get("type") != "object":
        # MCP's structured content is an object (2025-11-25): the result goes under "result".
        output = {"type": "object", "properties": {"result": output}}
    if output is not None and tool.session_required:
        output.setdefault("properties", {})[SESSION] = {"type": "string"}
    streaming = " Streams: each chunk is a progress notification; the result lists them."
    return MeshTool(
        name=capability,
        capability=capability,
        agent=agent,
        description=(tool.description or f"{capability} (agent {agent})")
        + (streaming if tool.streaming else ""),
        input_schema=schema,
        output_schema=None if tool.streaming else output,
        session_required=tool.session_required,
        streaming=tool.streaming,
    )
