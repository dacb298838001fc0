"""The agent of scripts/bench --moves' hibernation figures: each session keeps SIZE bytes."""

from __future__ import annotations

from sessionmesh import mesh


@mesh.agent(name="filler")
class Filler:
    pass


@mesh.tool(session_required=True)
def fill(session: mesh.Session, size: int) -> int:
    """Keep ``size`` bytes in the session (0: keep what it has); how many it keeps."""
    if size:
        session.state["data"] = "x" * size
    return len(session.state.get("data", ""))
