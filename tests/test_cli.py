"""`sessionmesh serve` as a real process: address, reflection-free calls, graceful stop."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from sessionmesh import mesh
from sessionmesh.testing import eventually
from tests.procs import serve

pytestmark = pytest.mark.anyio


async def test_serve_then_sigterm_finishes_calls_and_closes_sessions(tmp_path: Path) -> None:
    log = tmp_path / "closed.txt"
    started = tmp_path / "started.txt"
    log.touch()
    started.touch()
    env = {"CLOSE_LOG": str(log), "STARTED_LOG": str(started)}
    with serve("tests/agents/closing.py", env=env) as (proc, ready):
        assert ready["agent"] == "closing"
        assert ready["address"].startswith("127.0.0.1:")
        async with mesh.connect(ready["address"]) as client:
            assert {t["name"] for t in await client.list_tools()} == {"remember", "slow"}
            left_open = client.proxy("remember", session_required=True)
            assert await left_open(value="a") == "a"
            in_flight = asyncio.create_task(client.proxy("slow")(seconds=0.5))
            await eventually(lambda: started.read_text() == "slow\n", what="the slow call runs")
            proc.send_signal(signal.SIGTERM)
            assert await in_flight == "finished"
        await eventually(lambda: proc.poll() is not None, within=10, what="the agent exits")
        assert proc.returncode == 0
    assert log.read_text() == "a\n"  # the open session was closed, its callback ran once


def test_serve_reports_a_file_without_tools(tmp_path: Path) -> None:
    import subprocess
    import sys

    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    out = subprocess.run(
        [sys.executable, "-m", "sessionmesh.server._cli", "serve", str(empty)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode != 0
    assert "no @mesh.tool functions found" in out.stderr
