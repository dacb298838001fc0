"""The other side of scripts/bench --mcp: the same counter, served in-process by the MCP
SDK's own server (MCPServer.streamable_http_app). Prints its URL, serves until killed."""

from __future__ import annotations

import asyncio
import json
import socket
import sys

import uvicorn
from mcp.server.mcpserver import MCPServer

server = MCPServer("sdk-counter")
counts: dict[str, int] = {}
STATELESS = "--stateful" not in sys.argv


@server.tool()
def session_counter(increment: int = 1, session: str = "s") -> dict[str, int | str]:
    """The counter of examples/counter.py, its state in this process."""
    counts[session] = counts.get(session, 0) + increment
    return {"count": counts[session], "session": session}


async def main() -> None:
    sock = socket.create_server(("127.0.0.1", 0))
    config = uvicorn.Config(
        server.streamable_http_app(stateless_http=STATELESS), log_level="warning"
    )
    print(json.dumps({"url": f"http://127.0.0.1:{sock.getsockname()[1]}/mcp"}), flush=True)
    await uvicorn.Server(config).serve(sockets=[sock])  # listening already: callers queue


if __name__ == "__main__":
    asyncio.run(main())
