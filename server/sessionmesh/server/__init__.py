"""The sessionmesh agent runtime: declare tools, serve them, keep their sessions."""

from __future__ import annotations

from sessionmesh.client import Dependency
from sessionmesh.server._agent import Agent, agent
from sessionmesh.server._inject import Resolver, StaticResolver
from sessionmesh.server._session import Session, current_session
from sessionmesh.server._tool import ToolSpec, tool

__all__ = [
    "Agent",
    "Dependency",
    "Resolver",
    "Session",
    "StaticResolver",
    "ToolSpec",
    "agent",
    "current_session",
    "tool",
]
