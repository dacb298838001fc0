"""The demo mesh: a stateful provider, a consumer, and auto sessions you can watch.

Run with `scripts/demo`. Starts examples/counter.py and examples/consumer.py as real agent
processes on 127.0.0.1, calls the design note's consumers, and stops everything.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from sessionmesh import mesh

HERE = Path(__file__).resolve().parent


def start(file: str, *args: str) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "sessionmesh.server._cli", "serve", str(HERE / file), *args],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"demo: {file} did not start")
    return proc, json.loads(line)


def show(title: str, value: Any) -> None:
    print(f"\n== {title}")
    print(json.dumps(value, indent=2))


async def main() -> None:
    procs: list[subprocess.Popen[str]] = []
    try:
        counter, ready = start("counter.py")
        procs.append(counter)
        peers = [
            f"--peer={cap}={ready['address']}"
            for cap in ("session_counter", "stream_count", "analyze")
        ]
        consumer, consumer_ready = start("consumer.py", *peers)
        procs.append(consumer)
        async with mesh.connect(consumer_ready["address"]) as client:
            auto = await client.proxy("auto_session_test")(test_rounds=3)
            show("auto sessions: 3 rounds, increment=round -> counts 1, 3, 6 in one session", auto)
            counts = [r["response"]["count"] for r in auto["results"]]
            sessions = {r["response"]["session"] for r in auto["results"]}
            print(f"counts {counts}, in {len(sessions)} session(s)")
            show(
                "a new invocation gets a fresh session",
                await client.proxy("auto_session_test")(test_rounds=2),
            )
            show("manual sessions, the old way", await client.proxy("session_test")(test_rounds=3))
            show(
                "reliable counter (retries, deadline)",
                await client.proxy("reliable_counter")(amount=5),
            )
            show(
                "streaming inside a session",
                [c async for c in client.proxy("streaming_session_service").stream()],
            )
            show(
                "stream analytics",
                [
                    c
                    async for c in client.proxy("stream_analytics").stream(
                        dataset="sessions that just work"
                    )
                ],
            )
        async with mesh.connect(ready["address"]) as provider:
            async with provider.proxy("session_counter", session_required=True) as direct:
                reply = await direct(increment=1)
                show("calling the provider directly, in an auto session", reply)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=15)
    print("\nall agents stopped; every session was closed (see the log lines above).")


if __name__ == "__main__":
    asyncio.run(main())
