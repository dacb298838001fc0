"""Which providers a dependency matches: capability, tags, version constraints."""

from __future__ import annotations

import pytest

from sessionmesh.core import Dependency
from sessionmesh.core._dependency import version_matches
from sessionmesh.errors import UsageError
from sessionmesh.v1 import registry_service_pb2 as rpb
from sessionmesh.v1 import session_service_pb2 as pb


@pytest.mark.parametrize(
    ("version", "constraint", "ok"),
    [
        ("1.2.0", None, True),
        ("1.2.0", ">=1", True),
        ("0.9", ">=1", False),
        ("1.2.0", ">=1,<2", True),
        ("2.0", ">=1,<2", False),
        ("1.2", "==1.2.0", True),
        ("1.2", "1.2", True),
        ("1.3", "!=1.2", True),
        ("", ">=1", False),
        # PEP 440, as packaging reads it: a pre-release is not >= its release ...
        ("1.2.0rc1", ">=1.2", False),
        # ... and ~= is compatible-release.
        ("1.4.7", "~=1.4", True),
        ("2.0", "~=1.4", False),
    ],
)
def test_version_constraints(version: str, constraint: str | None, ok: bool) -> None:
    assert version_matches(version, constraint) is ok


def test_a_bad_constraint_fails_when_declared() -> None:
    with pytest.raises(UsageError, match="bad version constraint"):
        Dependency.parse({"capability": "x", "version": "about 1"})


def _instance(*tools: pb.Tool) -> rpb.Instance:
    return rpb.Instance(instance_id="i", tools=tools)


def test_capability_tags_and_version_select_providers() -> None:
    fast_v2 = _instance(pb.Tool(name="f", capability="search", tags=["fast", "eu"], version="2.1"))
    slow_v1 = _instance(pb.Tool(name="g", capability="search", tags=["slow"], version="1.0"))
    assert Dependency("search").matches(fast_v2) and Dependency("search").matches(slow_v1)
    assert Dependency("f").matches(fast_v2)  # a function name works too
    want_fast = Dependency.parse({"capability": "search", "tags": ["fast"]})
    assert want_fast.matches(fast_v2) and not want_fast.matches(slow_v1)
    want_v1 = Dependency.parse({"capability": "search", "version": "<2"})
    assert want_v1.matches(slow_v1) and not want_v1.matches(fast_v2)
    assert not Dependency.parse({"capability": "search", "tags": ["fast", "us"]}).matches(fast_v2)
    assert not Dependency("other").matches(fast_v2)
