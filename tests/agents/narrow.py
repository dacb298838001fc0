"""A counter whose Exchange streams carry at most 8 calls at once: for the limit's tests."""

from __future__ import annotations

from sessionmesh import mesh


@mesh.agent(name="narrow", max_calls_per_stream=8)
class Narrow:
    pass


@mesh.tool(session_required=True)
def count(session: mesh.Session) -> int:
    session.state["n"] = session.state.get("n", 0) + 1
    return int(session.state["n"])
