"""scripts/bench --mcp: a tools/call through the MCP front door to a mesh session (front
door, registry and agent in their own processes) against the same function served
in-process by the MCP SDK's own server; one SDK client, alternating pairs, each the median
call time of a run of calls. Prints the ratio's median with its spread."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

from mcp import Client

HERE = Path(__file__).resolve().parent
CLI = [sys.executable, "-m", "sessionmesh.server._cli"]


@contextlib.asynccontextmanager
async def child(*args: str) -> AsyncIterator[dict[str, str]]:
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        assert proc.stdout is not None
        yield json.loads(await proc.stdout.readline())
    finally:
        proc.kill()
        await proc.wait()


async def median_call(url: str, calls: int, mode: str) -> float:
    async with Client(url, mode=mode) as client:
        first = await client.call_tool("session_counter", {"increment": 1})
        handle = first.structured_content["session"]
        took = []
        for _ in range(calls):
            began = time.perf_counter()
            reply = await client.call_tool("session_counter", {"increment": 1, "session": handle})
            took.append(time.perf_counter() - began)
            assert not reply.is_error
        with contextlib.suppress(Exception):
            await client.call_tool("close_session", {"session": handle})
    return statistics.median(took)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=7)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--mode", default="2026-07-28", help="the client's protocol era")
    args = parser.parse_args()
    counter = str(HERE.parent / "examples" / "counter.py")
    async with (
        child(*CLI, "registry", "--port", "0") as reg,
        child(*CLI, "serve", counter, "--registry", reg["registry"]),
        child(*CLI, "mcp", "--port", "0", "--registry", reg["registry"]) as door,
        child(sys.executable, str(HERE / "_bench_mcp_sdk.py")) as sdk,
    ):
        await asyncio.sleep(1.0)  # the front door's first view of the agent
        ours, theirs, ratios = [], [], []
        for _ in range(args.pairs):
            a = await median_call(door["url"], args.calls, args.mode)
            b = await median_call(sdk["url"], args.calls, args.mode)
            ours.append(a * 1e6)
            theirs.append(b * 1e6)
            ratios.append(a / b)
    print(f"tools/call, {args.mode}, {args.pairs} pairs of {args.calls} calls:")
    print(f"  front door to a mesh session: {statistics.median(ours):.0f} us")
    print(f"  the SDK's own server, in process: {statistics.median(theirs):.0f} us")
    print(
        f"  ratio: {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}), "
        "target <= 1.25x"
    )


if __name__ == "__main__":
    asyncio.run(main())
