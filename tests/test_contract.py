"""The committed generated code matches the .proto, and the public names are curated."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(
        [str(ROOT / "scripts" / "gen_protos"), str(tmp_path)],
        check=True,
        env=env,
        capture_output=True,
    )
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert generated, "gen_protos produced nothing"
    committed = sorted(
        p.relative_to(PROTOS) for p in PROTOS.rglob("*_pb2*") if p.suffix in (".py", ".pyi")
    )
    assert committed == generated, "generated files differ from the committed ones"
    stale = [str(p) for p in generated if not filecmp.cmp(tmp_path / p, PROTOS / p, shallow=False)]
    assert not stale, f"stale generated code, run scripts/gen_protos: {stale}"


@pytest.mark.parametrize(
    "module",
    [
        "sessionmesh.mesh",
        "sessionmesh.client",
        "sessionmesh.server",
        "sessionmesh.client.errors",
        "sessionmesh.testing",
    ],
)
def test_public_names_are_exported_and_exist(module: str) -> None:
    mod = __import__(module, fromlist=["__all__"])
    names = mod.__all__
    assert names == sorted(names), f"{module}.__all__ is not sorted"
    for name in names:
        assert hasattr(mod, name), f"{module}.__all__ names {name!r}, which does not exist"
        assert not name.startswith("_")


def test_mesh_namespace_is_the_design_notes_api() -> None:
    from sessionmesh import mesh

    for name in ("tool", "agent", "Session", "McpAgent", "connect", "current_session", "errors"):
        assert name in mesh.__all__


def test_client_never_imports_server() -> None:
    code = (
        "import sys, sessionmesh.client, sessionmesh.client.errors; "
        "print(any(m.startswith('sessionmesh.server') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "False"
    for path in (ROOT / "client").rglob("*.py"):
        assert "sessionmesh.server" not in path.read_text(), path
