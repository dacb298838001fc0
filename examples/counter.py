"""A stateful provider: the design note's `session_counter`, plus a stream inside the session.

sessionmesh serve examples/counter.py
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Literal

from sessionmesh import mesh

log = logging.getLogger("examples.counter")


@mesh.agent(name="counter")
class Counter:
    """Settings for `sessionmesh serve`: name the agent; host and port stay the defaults."""


@mesh.tool(capability="session_counter", session_required=True, stateful=True)
def increment(
    session: mesh.Session,
    increment: int = 1,
    amount: int | None = None,
    operation: Literal["increment", "get"] = "increment",
) -> dict[str, int | str]:
    """Add `increment` (or `amount`, as the note's enhanced proxy sends it) to this
    session's count, or only read it (`operation="get"`); return the count."""
    if "count" not in session.state:
        session.on_close(
            lambda: log.info(
                "session %s closed at count %s", session.short_id, session.state["count"]
            )
        )
        session.state["count"] = 0
    if operation == "increment":
        session.state["count"] += increment if amount is None else amount
    return {"count": session.state["count"], "session": session.short_id}


@mesh.tool(capability="stream_counter", session_required=True, stateful=True)
async def stream_count(
    session: mesh.Session, start: int = 1, n: int = 3
) -> AsyncIterator[dict[str, int]]:
    """Stream `n` numbers from `start`, each with this session's count."""
    for i in range(start, start + n):
        yield {"i": i, "count": session.state.get("count", 0)}
