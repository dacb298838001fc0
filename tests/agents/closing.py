"""An agent for process tests: writes its sessions' close callbacks to $CLOSE_LOG."""

from __future__ import annotations

import asyncio
import os

from sessionmesh import mesh


@mesh.agent(name="closing", session_ttl=60)
class Closing:
    pass


@mesh.tool(session_required=True)
def remember(session: mesh.Session, value: str) -> str:
    session.on_close(lambda: _append(os.environ["CLOSE_LOG"], value))
    return value


@mesh.tool
async def slow(seconds: float) -> str:
    _append(os.environ["STARTED_LOG"], "slow")
    await asyncio.sleep(seconds)
    return "finished"


def _append(path: str, line: str) -> None:
    with open(path, "a") as f:
        f.write(line + "\n")
