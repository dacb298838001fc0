"""The design note's `analytics_engine`: a stateful provider whose `analyze` tool streams.

sessionmesh serve examples/analytics.py
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from sessionmesh import mesh


@mesh.agent(name="analytics")
class Analytics:
    """Settings for `sessionmesh serve`: the agent's name."""


@mesh.tool(capability="analytics_engine", session_required=True, stateful=True)
async def analyze(session: mesh.Session, dataset: str) -> AsyncIterator[dict[str, object]]:
    """Stream a toy analysis of `dataset`, word by word, remembering how many datasets this
    session has seen."""
    session.state["datasets"] = session.state.get("datasets", 0) + 1
    for word in dataset.split():
        yield {"word": word, "length": len(word), "datasets_seen": session.state["datasets"]}
