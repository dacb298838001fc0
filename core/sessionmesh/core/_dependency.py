"""What a consumer asks the mesh for: a capability, narrowed by tags and versions."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from sessionmesh.errors import UsageError
from sessionmesh.v1 import registry_service_pb2 as rpb
from sessionmesh.wire.names import answers_to


def _specifiers(constraint: str) -> SpecifierSet:
    # A bare version ("1.2") means exactly it, as it always has.
    text = constraint.strip()
    if text and text[0].isdigit():
        text = "==" + text
    try:
        return SpecifierSet(text)
    except InvalidSpecifier:
        raise UsageError(
            f"bad version constraint {constraint!r}: use PEP 440 specifiers, e.g. '>=1', "
            "'>=1.2,<2', '~=1.4'"
        ) from None


def version_matches(version: str, constraint: str | None) -> bool:
    """Whether ``version`` ("1.2.3") meets ``constraint`` (">=1,<2", "~=1.4", "1.2"), by
    PEP 440: pre-releases match only a constraint that names one."""
    if not constraint:
        return True
    specifiers = _specifiers(constraint)
    try:
        return Version(version) in specifiers
    except InvalidVersion:
        return False  # an unversioned (or unparseable) tool meets no constraint


@dataclasses.dataclass(frozen=True, slots=True)
class Dependency:
    """A capability wanted, optionally narrowed by tags (all must be present) and a version
    constraint (PEP 440: ">=1", ">=1.2,<2", "~=1.4")."""

    capability: str
    tags: tuple[str, ...] = ()
    version: str | None = None

    def __post_init__(self) -> None:
        if self.version:
            _specifiers(self.version)  # a bad constraint fails now, not per call

    @classmethod
    def parse(cls, raw: str | Mapping[str, Any]) -> Dependency:
        if isinstance(raw, str):
            return cls(raw)
        unknown = set(raw) - {"capability", "tags", "version"}
        if unknown or "capability" not in raw:
            raise UsageError(
                f"a dependency is a capability name or a dict with 'capability' and optional "
                f"'tags', 'version'; got {dict(raw)!r}"
            )
        return cls(str(raw["capability"]), tuple(raw.get("tags", ())), raw.get("version"))

    def matches(self, instance: rpb.Instance) -> bool:
        for tool in instance.tools:
            if not answers_to(tool, self.capability):
                continue
            if not set(self.tags) <= set(tool.tags):
                continue
            if version_matches(tool.version, self.version):
                return True
        return False
