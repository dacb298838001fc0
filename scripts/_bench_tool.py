"""The tool the bench's agents serve and the arguments it is called with. Public API only:
``scripts/bench --against REV`` serves it with an older revision's code too."""

from __future__ import annotations

from typing import Any

from sessionmesh import mesh

# A Struct of 3 fields, as in the baseline figures.
ARGS: dict[str, Any] = {"increment": 1, "note": "bench", "flag": True}


@mesh.tool(session_required=True)
async def bump(
    session: mesh.Session, increment: int = 1, note: str = "", flag: bool = False
) -> int:
    count: int = session.state.get("count", 0) + increment
    session.state["count"] = count
    return count
