"""The sessionmesh agent runtime: declare tools, serve them, keep their sessions.

Names load on first use (PEP 562), so that importing one light module of this package
(declaring a tool: ``_declare``; the ``Session`` type) does not load the whole runtime.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sessionmesh.core import Dependency
    from sessionmesh.server._agent import Agent
    from sessionmesh.server._declare import ToolSpec, agent, tool
    from sessionmesh.server._inject import RegistryResolver, Resolver, StaticResolver
    from sessionmesh.server._registry import MemoryStore, Registry, RegistryStore
    from sessionmesh.server._security import Peer, Verifier
    from sessionmesh.server._session import Session, current_session

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

#: Where each public name lives.
_HOME = {
    "Agent": "sessionmesh.server._agent",
    "Dependency": "sessionmesh.core",
    "MemoryStore": "sessionmesh.server._registry",
    "Peer": "sessionmesh.server._security",
    "Registry": "sessionmesh.server._registry",
    "RegistryResolver": "sessionmesh.server._inject",
    "RegistryStore": "sessionmesh.server._registry",
    "Resolver": "sessionmesh.server._inject",
    "Session": "sessionmesh.server._session",
    "StaticResolver": "sessionmesh.server._inject",
    "ToolSpec": "sessionmesh.server._declare",
    "Verifier": "sessionmesh.server._security",
    "agent": "sessionmesh.server._declare",
    "current_session": "sessionmesh.server._session",
    "tool": "sessionmesh.server._declare",
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'sessionmesh.server' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    if home.startswith(__name__):
        from sessionmesh.core import publish  # not at import: the package loads nothing

        publish(__name__, value)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
