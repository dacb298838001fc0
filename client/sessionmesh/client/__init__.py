"""The sessionmesh client: connect to an agent and call its tools through proxies."""

from __future__ import annotations

from sessionmesh.client import errors
from sessionmesh.client._client import AgentClient, MeshClient, connect
from sessionmesh.client._dependency import Dependency
from sessionmesh.client._grpc import GrpcEndpoint
from sessionmesh.client._loop import run
from sessionmesh.client._proxy import (
    BaseProxy,
    McpAgent,
    Proxy,
    ProxyOptions,
    StreamingProxy,
    TypedProxy,
)
from sessionmesh.client._security import TLS, Credentials
from sessionmesh.client._stream import ChunkStream
from sessionmesh.client._sync import SyncClient, SyncProxy, connect_sync
from sessionmesh.client._transport import (
    Answer,
    Endpoint,
    EndpointTransport,
    StreamCall,
    Transport,
)

__all__ = [
    "TLS",
    "AgentClient",
    "Answer",
    "BaseProxy",
    "ChunkStream",
    "Credentials",
    "Dependency",
    "Endpoint",
    "EndpointTransport",
    "GrpcEndpoint",
    "McpAgent",
    "MeshClient",
    "Proxy",
    "ProxyOptions",
    "StreamCall",
    "StreamingProxy",
    "SyncClient",
    "SyncProxy",
    "Transport",
    "TypedProxy",
    "connect",
    "connect_sync",
    "errors",
    "run",
]
