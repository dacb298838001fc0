"""What a user's strict mypy sees of sessionmesh, installed as a package (py.typed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

USER_CODE = """
from __future__ import annotations

from sessionmesh import mesh


@mesh.tool(session_required=True)
def increment(session: mesh.Session, increment: int = 1) -> int:
    session.state["n"] = session.state.get("n", 0) + increment
    return int(session.state["n"])


@mesh.tool
async def total(prices: list[float]) -> float:
    return sum(prices)


async def main() -> None:
    async with mesh.connect("127.0.0.1:50051") as agent:
        counter = agent.proxy("increment", session_required=True)
        n: int = await counter(increment=1)
        reveal_type(counter)
        reveal_type(agent.proxy("increment", streaming=True))
        reveal_type(counter.options(streaming=True))
        reveal_type(await agent.proxy(increment, session_required=True)(increment=1))
        reveal_type(await agent.proxy(total)(prices=[1.5]))
        print(n)
    async with mesh.connect(registry="127.0.0.1:50050") as mesh_client:
        reveal_type(await mesh_client.proxy(total)(prices=[2.5]))
        async with mesh_client.proxy(increment, session_required=True) as typed:
            reveal_type(await typed(increment=1))
            reveal_type(await typed.options(timeout=5)(increment=1))


def blocking() -> None:
    with mesh.connect_sync() as client:
        with client.proxy(increment, session_required=True) as counter:
            reveal_type(counter(increment=1))
            reveal_type(counter.options(timeout=5)(increment=1))
        reveal_type(client.proxy("increment")(increment=1))
"""


@pytest.mark.slow
def test_a_users_strict_mypy_sees_our_types(tmp_path: Path) -> None:
    (tmp_path / "user.py").write_text(USER_CODE)
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "user.py"],
        cwd=tmp_path,  # outside the repo: our own mypy settings do not apply
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    revealed = [line.split('"')[1] for line in out.stdout.splitlines() if "Revealed type" in line]
    assert revealed == [
        "sessionmesh.client._proxy.Proxy",
        "sessionmesh.client._proxy.StreamingProxy",
        "sessionmesh.client._proxy.StreamingProxy",
        "int",
        "float",
        "float",
        "int",
        "int",
        "int",
        "int",
        "Any",
    ]
