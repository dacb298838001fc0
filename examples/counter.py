"""A stateful provider: the design note's `session_counter`, plus a stream inside the session.

sessionmesh serve examples/counter.py
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from sessionmesh import mesh

log = logging.getLogger("examples.counter")


@mesh.agent(name="counter")
class Counter:
    """Settings for `sessionmesh serve`: name the agent; host and port stay the defaults."""


@mesh.tool(capability="session_counter", session_required=True, stateful=True)
def increment(session: mesh.Session, increment: int = 1) -> dict[str, int | str]:
    """Add `increment` to this session's count; return the count."""
    if "count" not in session.state:
        session.on_close(
            lambda: log.info(
                "session %s closed at count %s", session.short_id, session.state["count"]
            )
        )
        session.state["count"] = 0
    session.state["count"] += increment
    return {"count": session.state["count"], "session": session.short_id}


@mesh.tool(capability="stream_count", session_required=True, stateful=True)
async def stream_count(
    session: mesh.Session, start: int = 1, n: int = 3
) -> AsyncIterator[dict[str, int]]:
    """Stream `n` numbers from `start`, each with this session's count."""
    for i in range(start, start + n):
        yield {"i": i, "count": session.state.get("count", 0)}


@mesh.tool(capability="analyze", session_required=True, stateful=True)
async def analyze(session: mesh.Session, dataset: str) -> AsyncIterator[dict[str, object]]:
    """Stream a toy analysis of `dataset`, remembering how many datasets this session saw."""
    session.state["datasets"] = session.state.get("datasets", 0) + 1
    for word in dataset.split():
        yield {"word": word, "length": len(word), "datasets_seen": session.state["datasets"]}
