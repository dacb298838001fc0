"""The sessionmesh client: connect to an agent and call its tools through proxies.

What the client shares with the server (``TLS``, ``ProxyOptions``, ``Dependency``, ``run``)
is ``sessionmesh.core``'s; errors are ``sessionmesh.errors``; ``from sessionmesh import
mesh`` gathers every name a user needs.
"""

from __future__ import annotations

from sessionmesh.client._client import AgentClient, MeshClient, connect
from sessionmesh.client._proxy import (
    BaseProxy,
    McpAgent,
    Proxy,
    StreamingProxy,
)
from sessionmesh.client._stream import ChunkStream
from sessionmesh.client._sync import SyncClient, SyncProxy, connect_sync
from sessionmesh.client._transport import (
    Answer,
    Endpoint,
    EndpointTransport,
    StreamCall,
    Transport,
)
from sessionmesh.client._typed import TypedProxy
from sessionmesh.core import publish

__all__ = [
    "AgentClient",
    "Answer",
    "BaseProxy",
    "ChunkStream",
    "Endpoint",
    "EndpointTransport",
    "McpAgent",
    "MeshClient",
    "Proxy",
    "StreamCall",
    "StreamingProxy",
    "SyncClient",
    "SyncProxy",
    "Transport",
    "TypedProxy",
    "connect",
    "connect_sync",
]

publish(__name__, *(globals()[name] for name in __all__))
