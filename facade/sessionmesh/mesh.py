"""The one import a sessionmesh user needs: ``from sessionmesh import mesh``.

Declare tools with ``@mesh.tool``, name the agent with ``@mesh.agent``, receive the session
with a ``mesh.Session`` parameter, receive dependencies as ``mesh.McpAgent`` proxies, and call
agents with ``mesh.connect``. A process that only calls agents, or declares tools (to
import them for typed proxies), never loads the agent runtime: server names are imported
on first use, each from its own module (``tool`` and ``agent`` from the light ``_declare``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from sessionmesh import errors
from sessionmesh.client import (
    AgentClient,
    ChunkStream,
    McpAgent,
    MeshClient,
    Proxy,
    StreamingProxy,
    connect,
    connect_sync,
)
from sessionmesh.core import TLS, Dependency, ProxyOptions, run
from sessionmesh.core._deadline import time_remaining
from sessionmesh.wire.names import short as short_id

if TYPE_CHECKING:
    from sessionmesh.server import Agent, Registry, Session, agent, current_session, tool

__all__ = [
    "TLS",
    "Agent",
    "AgentClient",
    "ChunkStream",
    "Dependency",
    "McpAgent",
    "MeshClient",
    "Proxy",
    "ProxyOptions",
    "Registry",
    "Session",
    "StreamingProxy",
    "agent",
    "connect",
    "connect_sync",
    "current_session",
    "errors",
    "run",
    "short_id",
    "time_remaining",
    "tool",
]

_SERVER_NAMES = frozenset({"Agent", "Registry", "Session", "agent", "current_session", "tool"})


def __getattr__(name: str) -> Any:
    if name in _SERVER_NAMES:
        value = getattr(importlib.import_module("sessionmesh.server"), name)
        globals()[name] = value  # once loaded, a plain attribute
        return value
    raise AttributeError(f"module 'sessionmesh.mesh' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
