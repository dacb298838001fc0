"""The sessionmesh agent runtime: declare tools, serve them, keep their sessions."""

from __future__ import annotations

from sessionmesh.client import Dependency
from sessionmesh.server._agent import Agent, agent
from sessionmesh.server._inject import RegistryResolver, Resolver, StaticResolver
from sessionmesh.server._registry import MemoryStore, Registry, RegistryStore
from sessionmesh.server._security import Peer, Verifier
from sessionmesh.server._session import Session, current_session
from sessionmesh.server._tool import ToolSpec, tool

__all__ = [
    "Agent",
    "Dependency",
    "MemoryStore",
    "Peer",
    "Registry",
    "RegistryResolver",
    "RegistryStore",
    "Resolver",
    "Session",
    "StaticResolver",
    "ToolSpec",
    "Verifier",
    "agent",
    "current_session",
    "tool",
]
