"""Consumers for every example of the design note, against examples/counter.py (the
`session_counter` and `stream_counter` capabilities) and examples/analytics.py
(`analytics_engine`). Each is the note's code, give or take `mesh.` prefixes.

sessionmesh run examples/counter.py examples/analytics.py examples/consumer.py
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from sessionmesh import mesh


@mesh.agent(name="consumer")
class Consumer:
    pass


@mesh.tool(capability="session_test", dependencies=["session_counter"])
async def test_session_affinity(
    test_rounds: int = 3, session_counter: mesh.McpAgent | None = None
) -> dict[str, Any]:
    """Manual sessions, the old way: create, call with the id, close."""
    if not session_counter:
        return {"error": "No session_counter service available"}
    session_id = await session_counter.create_session()
    try:
        results = []
        for round_num in range(1, test_rounds + 1):
            result = await session_counter.call_with_session(
                session_id=session_id, increment=round_num
            )
            results.append({"round": round_num, "response": result})
    finally:
        await session_counter.close_session(session_id)
    return {"session_id": mesh.short_id(session_id), "test_rounds": test_rounds, "results": results}


@mesh.tool(
    capability="auto_session_test",
    dependencies=["session_counter"],
    session_required=True,
    stateful=True,
    auto_session_management=True,
)
async def test_auto_session_affinity(
    test_rounds: int = 3, session_counter: mesh.McpAgent | None = None
) -> dict[str, Any]:
    """Automatic sessions: the proxy opens, reuses and closes the session itself."""
    if not session_counter:
        return {"error": "No session_counter service available"}
    results = []
    for round_num in range(1, test_rounds + 1):
        result = await session_counter(increment=round_num)
        results.append({"round": round_num, "response": result})
    return {"test_rounds": test_rounds, "results": results, "auto_session": True}


@mesh.tool(
    capability="reliable_counter",
    dependencies=["session_counter"],
    session_required=True,
    retry_count=3,
    retry_delay=1.0,
    timeout=30,
    auto_session_management=True,
)
async def reliable_increment(
    amount: int = 1, session_counter: mesh.McpAgent | None = None
) -> dict[str, Any]:
    """Retries and a deadline on every call, never running an increment twice."""
    if not session_counter:
        return {"error": "No session_counter service available"}
    result: dict[str, Any] = await session_counter(increment=amount)
    return result


@mesh.tool(
    capability="streaming_session_service",
    dependencies=["stream_counter"],
    session_required=True,
    streaming=True,
    auto_session_management=True,
)
async def stream_with_sessions(
    stream_counter: mesh.McpAgent | None = None,
) -> AsyncIterator[dict[str, Any]]:
    """Streams inside one auto session."""
    if not stream_counter:
        return
    async for chunk in stream_counter.call_tool_auto("stream_count", {"start": 1}):
        yield chunk


@mesh.tool(
    capability="stream_analytics",
    dependencies=["analytics_engine"],
    session_required=True,
    streaming=True,
    stream_timeout=300,
    buffer_size=8192,
    auto_session_management=True,
)
async def stream_analytics(
    dataset: str, analytics_engine: mesh.McpAgent | None = None
) -> AsyncIterator[dict[str, Any]]:
    """Streams an analysis; the session is closed when the stream ends."""
    if not analytics_engine:
        return
    async for result in analytics_engine.call_tool_auto("analyze", {"dataset": dataset}):
        yield result


@mesh.tool(
    capability="stateful_service",
    dependencies=["session_counter"],
    session_required=True,  # Enable session requirement
    stateful=True,  # Mark as stateful capability
    auto_session_management=True,  # Enable automatic session handling (default)
    timeout=60,  # Also supports other enhancements
    retry_count=3,
    streaming=True,
)
def my_stateful_function(session_counter: mesh.McpAgent | None = None) -> Any:
    """The note's synchronous tool: a plain def calls its proxy without await (it runs in
    a worker thread); `streaming=True` serves its result as a one-chunk stream."""
    assert session_counter is not None
    return session_counter(operation="increment")


@mesh.tool(
    capability="my_service",
    dependencies=["session_counter"],
    session_required=True,  # Add session requirement
    auto_session_management=True,  # Enable automatic management
)
async def my_function(session_counter: mesh.McpAgent | None = None) -> Any:
    """The note's migration example, after: no session code at all."""
    assert session_counter is not None
    result = await session_counter(operation="increment")
    return result  # noqa: RET504  # the note's code, as written
