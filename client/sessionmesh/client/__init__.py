"""The sessionmesh client: connect to an agent and call its tools through proxies."""

from __future__ import annotations

from sessionmesh.client import errors
from sessionmesh.client._client import AgentClient, MeshClient, connect
from sessionmesh.client._mesh import Dependency
from sessionmesh.client._proxy import ChunkStream, McpAgent, Proxy, ProxyOptions
from sessionmesh.client._transport import ChannelTransport, Endpoint, Transport

__all__ = [
    "AgentClient",
    "ChannelTransport",
    "ChunkStream",
    "Dependency",
    "Endpoint",
    "McpAgent",
    "MeshClient",
    "Proxy",
    "ProxyOptions",
    "Transport",
    "connect",
    "errors",
]
