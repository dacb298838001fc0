"""Giving memory back to the system after sessions leave it (hibernation).

CPython hands the state of a session (strings over 512 bytes, dicts) to the C allocator,
and glibc keeps what is freed inside its heap for reuse: a process that let 20,000 sessions
hibernate keeps most of their memory unless it asks glibc to return the free pages
(``malloc_trim``). Elsewhere (musl, macOS) this is a no-op."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
from collections.abc import Callable

#: At most one trim per this many seconds, after sessions left.
_EVERY = 1.0


def _malloc_trim() -> Callable[[int], int] | None:
    with contextlib.suppress(OSError, AttributeError, TypeError):
        trim: Callable[[int], int] = ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
        return trim
    return None


_trim = _malloc_trim()
_pending: asyncio.TimerHandle | None = None


def soon() -> None:
    """Give freed memory back a little later (sessions leave in runs: one trim for a run)."""
    global _pending
    if _trim is None or (_pending is not None and not _pending.cancelled()):
        return
    _pending = asyncio.get_running_loop().call_later(_EVERY, _now)


def _now() -> None:
    global _pending
    _pending = None
    if _trim is not None:
        _trim(0)
