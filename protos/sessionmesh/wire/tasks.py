"""Stopping a task that may be inside a grpc.aio call; waking the tasks that wait for a
shared writer.

grpc.aio can absorb a cancellation: a task cancelled while a call awaits its own start-up
task sees that inner task swallow the CancelledError and carries on as if nothing
happened (observed with Register and Watch streams). One ``task.cancel()`` is then lost,
and ``await task`` waits forever. :func:`cancel_and_wait` cancels until the task is done.
"""

from __future__ import annotations

import asyncio
from typing import Any

#: How long one cancellation gets to land before it is sent again.
_RETRY = 0.1


async def cancel_and_wait(*tasks: asyncio.Task[Any]) -> None:
    """Cancel ``tasks`` and return once all are done (their outcomes marked as seen). A
    cancellation of the caller itself still propagates."""
    pending = {t for t in tasks if not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=_RETRY)
    for task in tasks:
        if not task.cancelled():
            task.exception()  # seen: asyncio would log it when the task is collected


def pulse(event: asyncio.Event) -> None:
    """Wake every task waiting on ``event`` now, and leave it unset: each checks again what
    it waits for and, if need be, waits for the next pulse. (One future shared by the
    waiters would be cancelled for all of them when one waiter is; a future per waiter kept
    in one slot wakes only the last.)"""
    event.set()
    event.clear()
