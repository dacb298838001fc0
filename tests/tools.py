"""Tools shared by the tests: the design note's session counter and friends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from sessionmesh import mesh


@mesh.tool(capability="session_counter", session_required=True, stateful=True)
def increment(session: mesh.Session, increment: int = 1) -> int:
    """Add ``increment`` to this session's count and return the count."""
    session.state["count"] = session.state.get("count", 0) + increment
    return int(session.state["count"])


@mesh.tool(session_required=True)
async def peek(session: mesh.Session) -> dict[str, Any]:
    return {"count": session.state.get("count", 0), "id": session.id}


@mesh.tool(capability="stream_count", session_required=True, streaming=True)
async def stream_count(
    session: mesh.Session, start: int = 1, n: int = 3
) -> AsyncIterator[dict[str, int]]:
    """Stream n numbers from start, each with the session's count."""
    for i in range(start, start + n):
        yield {"i": i, "count": session.state.get("count", 0)}


@mesh.tool
async def running_total(numbers: AsyncIterator[float]) -> AsyncIterator[float]:
    """Stream the running total of an input stream."""
    total = 0.0
    async for x in numbers:
        total += x
        yield total


@mesh.tool
async def echo(value: Any = None) -> Any:
    return value


@mesh.tool
def add(a: int, b: float = 0.5, tags: list[str] | None = None) -> float:
    return a + b + len(tags or [])


@mesh.tool
async def fail(message: str) -> None:
    raise ValueError(message)


@mesh.tool
async def not_json() -> Any:
    return {"a": {1, 2}}


@mesh.tool(timeout=0.2)
async def overrun() -> None:
    await asyncio.Event().wait()


@mesh.tool
async def wait_forever() -> None:
    await asyncio.Event().wait()
