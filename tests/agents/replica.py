"""A session-less tool that says which process answered: for routing tests."""

from __future__ import annotations

import os

from sessionmesh import mesh


@mesh.agent(name="replica")
class Replica:
    pass


@mesh.tool
def whoami() -> int:
    return os.getpid()
