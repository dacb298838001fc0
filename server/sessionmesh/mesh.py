"""The one import a sessionmesh user needs: ``from sessionmesh import mesh``.

Declare tools with ``@mesh.tool``, name the agent with ``@mesh.agent``, receive the session
with a ``mesh.Session`` parameter, receive dependencies as ``mesh.McpAgent`` proxies, and call
agents with ``mesh.connect``.
"""

from __future__ import annotations

from sessionmesh.client import (
    AgentClient,
    ChunkStream,
    Dependency,
    McpAgent,
    MeshClient,
    Proxy,
    connect,
    errors,
)
from sessionmesh.server import Agent, Registry, Session, agent, current_session, tool

__all__ = [
    "Agent",
    "AgentClient",
    "ChunkStream",
    "Dependency",
    "McpAgent",
    "MeshClient",
    "Proxy",
    "Registry",
    "Session",
    "agent",
    "connect",
    "current_session",
    "errors",
    "tool",
]
