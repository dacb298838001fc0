"""The demo mesh: a stateful provider, a consumer, and auto sessions you can watch.

Run with `scripts/demo`. `sessionmesh run` starts an embedded registry and
examples/counter.py, examples/analytics.py and examples/consumer.py as agent processes on
127.0.0.1; the demo calls every consumer of the design note through the registry, runs its
enhanced-proxy walkthrough (examples/enhanced_proxy.py), and stops everything.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from sessionmesh import mesh

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def show(title: str, value: Any) -> None:
    print(f"\n== {title}")
    print(json.dumps(value, indent=2))


async def tour(registry: str) -> None:
    async with mesh.connect(registry=registry) as client:
        auto = await client.proxy("auto_session_test")(test_rounds=3)
        show("auto sessions: 3 rounds, increment=round -> counts 1, 3, 6 in one session", auto)
        counts = [r["response"]["count"] for r in auto["results"]]
        sessions = {r["response"]["session"] for r in auto["results"]}
        print(f"counts {counts}, in {len(sessions)} session(s)")
        fresh = await client.proxy("auto_session_test")(test_rounds=2)
        show("a new invocation gets a fresh session", fresh)
        show("manual sessions, the old way", await client.proxy("session_test")(test_rounds=3))
        show(
            "reliable counter (retries, deadline)", await client.proxy("reliable_counter")(amount=5)
        )
        streamed = [c async for c in client.proxy("streaming_session_service").stream()]
        show("streaming inside a session", streamed)
        analysis = client.proxy("stream_analytics").stream(dataset="sessions that just work")
        show("stream analytics", [c async for c in analysis])
        show(
            "a plain def tool calling its proxy without await (streaming=True: one chunk)",
            [c async for c in client.proxy("stateful_service").stream()],
        )
        show("the migration example, after", await client.proxy("my_service")())
        async with client.proxy("session_counter", session_required=True) as direct:
            show("calling the provider directly, in an auto session", await direct(increment=1))
        rows = sorted((i.agent_name, i.instance_id, i.open_sessions) for i in client.instances())
        print(f"\ninstances (agent, id, open sessions): {rows}")


def main() -> None:
    # `sessionmesh run` starts an embedded registry and each file in its own process.
    command = [sys.executable, "-m", "sessionmesh.server._cli", "run"]
    files = [str(HERE / name) for name in ("counter.py", "analytics.py", "consumer.py")]
    run = subprocess.Popen(
        [*command, *files, "--registry-port", str(free_port())],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert run.stdout is not None
        line = run.stdout.readline()
        if not line:
            raise SystemExit("demo: the mesh did not start")
        registry = json.loads(line)["registry"]
        print(f"\nmesh up, registry {registry} (this demo stops it when done; to keep one up:")
        print(
            "  sessionmesh run examples/counter.py examples/analytics.py examples/consumer.py"
            "  # then sessionmesh list)"
        )
        asyncio.run(tour(registry))
        print("\n== the enhanced proxy walkthrough (examples/enhanced_proxy.py)")
        subprocess.run([sys.executable, str(HERE / "enhanced_proxy.py"), registry], check=True)
    finally:
        run.send_signal(signal.SIGINT)
        run.wait(timeout=60)
    print("\nmesh stopped; every session was closed (see the log lines above).")


if __name__ == "__main__":
    main()
