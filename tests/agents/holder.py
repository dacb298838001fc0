"""A consumer that opens a downstream session and then hangs: for killing mid-session."""

from __future__ import annotations

import asyncio

from sessionmesh import mesh


@mesh.agent(name="holder")
class Holder:
    pass


@mesh.tool(dependencies=["session_counter"], session_required=True)
async def hold(session_counter: mesh.McpAgent | None = None) -> None:
    assert session_counter is not None
    await session_counter(increment=1)
    await asyncio.Event().wait()


@mesh.tool(dependencies=["session_counter"], session_required=True)
async def count_twice(session_counter: mesh.McpAgent | None = None) -> object:
    """None when no provider is up: shows live rewiring."""
    if session_counter is None:
        return None
    await session_counter(increment=1)
    return await session_counter(increment=1)
