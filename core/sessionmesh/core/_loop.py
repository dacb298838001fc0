"""Which event loop sessionmesh's own processes run on: uvloop when it is installed
(``pip install 'sessionmesh[fast]'``), asyncio's otherwise, or when
``SESSIONMESH_LOOP=asyncio`` says so. Code that runs its own loop chooses for itself
(``uvloop.run(main())``); sessionmesh works on both."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

LOOP_ENV = "SESSIONMESH_LOOP"


def use_uvloop() -> bool:
    """Whether to run on uvloop: installed, and not turned off."""
    if os.environ.get(LOOP_ENV, "").lower() == "asyncio":
        return False
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run``, on uvloop when :func:`use_uvloop` says so."""
    if use_uvloop():
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)
