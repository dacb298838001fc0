"""The committed generated code matches the .proto, and the public names are curated."""

from __future__ import annotations

import filecmp
import importlib
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sessionmesh.wire import status

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


PUBLIC_MODULES = [
    "sessionmesh.mesh",
    "sessionmesh.errors",
    "sessionmesh.tracing",
    "sessionmesh.core",
    "sessionmesh.core.cli",
    "sessionmesh.client",
    "sessionmesh.client.cli",
    "sessionmesh.server",
    "sessionmesh.testing",
]


def _defined_in(value: object, module: str) -> bool:
    """Defined by ``module`` or one of its private submodules (not an import from elsewhere)."""
    if inspect.ismodule(value):
        return False  # submodules appear as attributes once imported; checked the other way
    home = str(getattr(value, "__module__", ""))
    return home == module or home.startswith(module + "._")


@pytest.mark.parametrize("module", PUBLIC_MODULES)
def test_exported_names_are_exactly_the_public_ones(module: str) -> None:
    mod = importlib.import_module(module)
    names = mod.__all__  # kept sorted by ruff (RUF022)
    for name in names:
        assert not name.startswith("_")
        assert hasattr(mod, name), f"{module}.__all__ names {name!r}, which does not exist"
    public = {n for n, v in vars(mod).items() if not n.startswith("_") and _defined_in(v, module)}
    unlisted = public - set(names)
    assert not unlisted, f"{module} has public names missing from __all__: {sorted(unlisted)}"


def test_errors_exports_only_the_hierarchy_and_its_code() -> None:
    from sessionmesh import errors

    for name in errors.__all__:
        value = getattr(errors, name)
        if name == "Code":  # what .code is: the wire's status code, not grpc's enum
            assert value is status.Code
            continue
        assert isinstance(value, type) and issubclass(value, errors.MeshError), name


def test_mesh_namespace_is_the_design_notes_api() -> None:
    from sessionmesh import mesh

    for name in ("tool", "agent", "Session", "McpAgent", "connect", "current_session", "errors"):
        assert name in mesh.__all__


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return out.stdout.strip()


def test_client_never_imports_server() -> None:
    code = (
        "import sys, sessionmesh.client, sessionmesh.errors, sessionmesh.client.cli; "
        "print(any(m.startswith('sessionmesh.server') for m in sys.modules))"
    )
    assert _run(code) == "False"
    for path in (ROOT / "client").rglob("*.py"):
        assert "sessionmesh.server" not in path.read_text(), path


def test_the_core_belongs_to_neither_side() -> None:
    code = (
        "import sys, sessionmesh.core, sessionmesh.core.cli, sessionmesh.core._reasons, "
        "sessionmesh.errors, sessionmesh.tracing; "
        "print(sorted({m.split('.')[1] for m in sys.modules if m.startswith('sessionmesh.')}))"
    )
    assert _run(code) == "['core', 'errors', 'tracing', 'v1', 'wire']"
    for path in (ROOT / "core").rglob("*.py"):
        text = path.read_text()
        assert "sessionmesh.client" not in text and "sessionmesh.server" not in text, path


def test_the_tree_says_who_depends_on_whom() -> None:
    # Each source root holds one layer; the facade (mesh, testing) is the only one that
    # joins the caller's side and the agent's.
    roots = {p.name for p in ROOT.iterdir() if (p / "sessionmesh").is_dir()}
    assert roots == {"protos", "core", "client", "server", "facade"}
    assert {p.name for p in (ROOT / "facade" / "sessionmesh").glob("*.py")} == {
        "mesh.py",
        "testing.py",
        "_memory.py",
    }


def test_grpc_status_codes_are_named_at_the_edges_only() -> None:
    # Everything above the transports speaks the wire's Code; grpc's enum is read where a
    # gRPC call failed (the client's edge) and nowhere else.
    hand_written = [
        p
        for root in ("protos/sessionmesh/wire", "core", "client", "server", "facade")
        for p in (ROOT / root).rglob("*.py")
    ]
    naming = sorted(p.name for p in hand_written if "grpc.StatusCode" in p.read_text())
    assert len(naming) <= 3, naming
    dispatcher = (ROOT / "server" / "sessionmesh" / "server" / "_dispatch.py").read_text()
    assert "import grpc" not in dispatcher


def test_a_caller_of_mesh_connect_does_not_load_the_agent_runtime() -> None:
    code = """
import asyncio, sys
from sessionmesh import mesh

async def main() -> None:
    async with mesh.connect("127.0.0.1:9") as client:
        client.proxy("anything", session_required=True)

asyncio.run(main())
# (grpc itself imports the top-level grpc_health and grpc_reflection packages, not these.)
heavy = ("sessionmesh.server", "grpc_health.", "grpc_reflection.", "grpc_status")
print(sorted(m for m in sys.modules if m.startswith(heavy)))
mesh.tool  # the first use of a runtime name loads it
print("sessionmesh.server" in sys.modules)
"""
    assert _run(code).splitlines() == ["[]", "True"]


def test_declaring_tools_does_not_load_the_agent_runtime() -> None:
    # Callers import tool functions for typed proxies: declaring must stay light.
    code = """
import sys
from sessionmesh import mesh

@mesh.tool(session_required=True, dependencies=["other"])
def increment(session: mesh.Session, other: mesh.McpAgent | None = None, by: int = 1) -> int:
    return by

@mesh.agent(name="counter", port=0)
class Counter: ...

runtime = ("_agent", "_service", "_dispatch", "_standard", "_inject", "_registry", "_tool")
loaded = [m for m in sys.modules if m.rpartition(".")[2] in runtime and "sessionmesh" in m]
loaded += [m for m in sys.modules if m.startswith(("grpc_health.", "grpc_reflection."))]
print(sorted(loaded))
"""
    assert _run(code) == "[]"


def test_server_uses_only_public_names_of_the_client() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}: {line.strip()}"
        for root in ("server", "facade")
        for path in (ROOT / root).rglob("*.py")
        for line in path.read_text().splitlines()
        if re.match(r"\s*(from|import) sessionmesh\.client(\.\w+)*\._", line)
        or re.match(r"\s*from sessionmesh\.client(\.\w+)* import _", line)
    ]
    assert not offenders, offenders


def test_the_contract_package_depends_on_neither_side() -> None:
    for path in (PROTOS / "sessionmesh" / "wire").rglob("*.py"):
        text = path.read_text()
        assert "sessionmesh.client" not in text and "sessionmesh.server" not in text, path
        assert "sessionmesh.core" not in text, path
        # The contract is data and rules; running things (tasks, loops) is the core's.
        assert "import asyncio" not in text, path


#: The client's edge to gRPC: the only modules that may hold a stub or see an RpcError.
# The edges to gRPC: agents (_grpc, _exchange, _status) and the etcd cluster (_etcd).
GRPC_EDGE = {"_grpc.py", "_exchange.py", "_status.py", "_etcd.py"}


def test_only_the_edge_touches_grpc_stubs_and_errors() -> None:
    for path in (ROOT / "client" / "sessionmesh" / "client").glob("*.py"):
        if path.name in GRPC_EDGE:
            continue
        text = path.read_text()
        for forbidden in ("AioRpcError", "RpcError", "_pb2_grpc", "Stub("):
            assert forbidden not in text, f"{path.name} uses {forbidden}: go through Endpoint"


def test_every_guarantee_names_a_test_that_exists() -> None:
    doc = (ROOT / "docs" / "guarantees.md").read_text()
    named = re.findall(r"`(test_\w+\.py)::(test_\w+)`", doc)
    assert len(named) >= 20, "docs/guarantees.md names too few tests"
    for module, test in named:
        source = (ROOT / "tests" / module).read_text()
        assert re.search(rf"^(async )?def {test}\(", source, re.M), f"{module}::{test} is gone"


def test_every_grpc_option_we_set_is_one_grpc_knows() -> None:
    # gRPC ignores an unknown option key without a word: a misspelt keepalive setting once
    # made our own servers answer our clients' pings with GOAWAY 'too_many_pings'.
    from sessionmesh.wire.etcd import channel_options as etcd_options
    from sessionmesh.wire.limits import channel_options, server_options

    cygrpc = importlib.import_module("grpc._cython.cygrpc")  # the compiled core
    known = Path(str(cygrpc.__file__)).read_bytes()
    for key, _ in [*channel_options(), *server_options(), *etcd_options()]:
        assert key.encode() + b"\0" in known, f"gRPC does not know the option {key!r}"


def test_no_hand_written_module_is_over_450_lines() -> None:
    # Split by job, not by line count; but past this, a module is doing more than one job.
    long = {
        str(path.relative_to(ROOT)): n
        for root in ("protos/sessionmesh/wire", "core", "client", "server", "facade")
        for path in (ROOT / root).rglob("*.py")
        if "_pb2" not in path.name and (n := len(path.read_text().splitlines())) > 450
    }
    assert not long, long
