"""A call's deadline travels to the calls it makes (as gRPC services propagate theirs).

The agent records the deadline of the call a tool runs for; every proxy call made inside
that tool then gets at most the time that remains (its own ``timeout`` can only shorten it).
"""

from __future__ import annotations

import asyncio
import contextvars

#: The deadline (event loop time) of the call the running tool serves, if it has one.
DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "sessionmesh_deadline", default=None
)


def time_remaining() -> float | None:
    """Seconds left before the deadline of the call this tool serves (None: no deadline).
    Calls the tool makes through its proxies get no more than this."""
    deadline = DEADLINE.get()
    if deadline is None:
        return None
    return deadline - asyncio.get_running_loop().time()


def tightened(deadline: float | None, timeout: float | None) -> float | None:
    """The earlier of ``deadline`` and ``timeout`` seconds from now."""
    if timeout is None:
        return deadline
    until = asyncio.get_running_loop().time() + timeout
    return until if deadline is None else min(deadline, until)


def bounded(timeout: float | None) -> float | None:
    """``timeout``, shortened to what remains of the current deadline (may be <= 0)."""
    remaining = time_remaining()
    if remaining is None:
        return timeout
    return remaining if timeout is None else min(timeout, remaining)
