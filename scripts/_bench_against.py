"""scripts/bench --against REV: this tree's agent against REV's, side by side.

Both agents serve the same tool, each in a process of its own (REV's code from a temporary
git worktree), and one client here calls them in alternating pairs, next to a bare grpc.aio
bidi echo, the floor. That isolates one change's effect, which a full bench run cannot
tell from the noise of two shared cores (one run's floor pairs swing from 1.2x to 1.8x).
The client is this tree's for both: what differs is the agent. REV's source roots are
whichever of protos/, core/, client/, server/ and facade/ it has.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
from _bench_tool import ARGS, bump

from sessionmesh import mesh
from sessionmesh.v1 import session_service_pb2 as pb
from sessionmesh.v1 import session_service_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
#: The namespace's source roots, in any revision (older ones have no core/ or facade/).
SOURCE_ROOTS = ("protos", "core", "client", "server", "facade")


async def serve_agent() -> None:
    agent = mesh.Agent([bump], name="bench-against")
    await agent.start()
    print(json.dumps({"address": agent.address}), flush=True)
    await asyncio.Event().wait()


async def serve_echo() -> None:
    from _bench import RawService

    server = grpc.aio.server()
    pb_grpc.add_SessionServiceServicer_to_server(RawService(), server)  # type: ignore[abstract]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(json.dumps({"address": f"127.0.0.1:{port}"}), flush=True)
    await asyncio.Event().wait()


@contextlib.contextmanager
def serving(role: str, roots: Path) -> Iterator[str]:
    """A child process serving ``role`` with the code under ``roots``; its address."""
    found = [roots / d for d in SOURCE_ROOTS if (roots / d).is_dir()]
    path = os.pathsep.join(str(d) for d in found)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([path, str(ROOT / "scripts")])}
    child = subprocess.Popen(
        [sys.executable, __file__, f"--serve-{role}"], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert child.stdout is not None
        yield str(json.loads(child.stdout.readline())["address"])
    finally:
        child.kill()
        child.wait()


@contextlib.contextmanager
def worktree(rev: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(tmp) / "rev"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(where), rev],
            check=True,
        )
        try:
            yield where
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(where)], check=True
            )


async def throughput(client: mesh.AgentClient, sessions: int = 64, per: int = 40) -> float:
    proxies = [client.proxy("bump", session_required=True) for _ in range(sessions)]
    await asyncio.gather(*(p(**ARGS) for p in proxies))

    async def loop(proxy: mesh.Proxy) -> None:
        for _ in range(per):
            await proxy(**ARGS)

    t0 = time.perf_counter()
    await asyncio.gather(*(loop(p) for p in proxies))
    rate = sessions * per / (time.perf_counter() - t0)
    for proxy in proxies:
        await proxy.cleanup_auto_session()
    return rate


def summary(name: str, ratios: list[float]) -> str:
    return (
        f"{name:<34} {statistics.median(ratios):6.3f}  "
        f"{min(ratios):.2f}-{max(ratios):.2f}  ({len(ratios)} pairs)"
    )


async def measure(echo_at: str, before: str, after: str, pairs: int, n: int) -> None:
    from _bench import _p50  # the measuring side only: served agents need no more than bump

    channel = grpc.aio.insecure_channel(echo_at)
    request = pb.ExchangeRequest(id=1, call=pb.CallRequest(tool="bump"))
    request.call.arguments.update(ARGS)
    echo_stream = pb_grpc.SessionServiceStub(channel).Exchange()

    async def echo() -> Any:
        await echo_stream.write(request)
        return await echo_stream.read()

    async with mesh.connect(before) as old, mesh.connect(after) as new:
        async with (
            old.proxy("bump", session_required=True) as old_call,
            new.proxy("bump", session_required=True) as new_call,
        ):
            sides: dict[str, Callable[[], Awaitable[Any]]] = {
                "echo": echo,
                "before": lambda: old_call(**ARGS),
                "after": lambda: new_call(**ARGS),
            }
            took: dict[str, list[float]] = {name: [] for name in sides}
            for i in range(pairs):  # alternating order, so drift hits every side alike
                for name in list(sides) if i % 2 == 0 else list(sides)[::-1]:
                    took[name].append(await _p50(sides[name], n))
        rates: dict[str, list[float]] = {"before": [], "after": []}
        for i in range(max(3, pairs // 2)):
            for name in ("before", "after") if i % 2 == 0 else ("after", "before"):
                rates[name].append(await throughput(old if name == "before" else new))
    echo_stream.cancel()
    await channel.close()

    def ratios(a: list[float], b: list[float]) -> list[float]:
        return [x / y for x, y in zip(a, b, strict=True)]

    print(
        f"session call p50: before {statistics.median(took['before']):.0f} µs, after "
        f"{statistics.median(took['after']):.0f} µs, bidi echo "
        f"{statistics.median(took['echo']):.0f} µs (medians)"
    )
    print(f"{'figure':<34} {'median':>6}  spread")
    print(summary("session call ÷ before's", ratios(took["after"], took["before"])))
    print(summary("before ÷ bidi echo", ratios(took["before"], took["echo"])))
    print(summary("after ÷ bidi echo", ratios(took["after"], took["echo"])))
    print(summary("64 sessions calls/s ÷ before's", ratios(rates["after"], rates["before"])))


def main() -> None:
    parser = argparse.ArgumentParser(prog="scripts/bench --against")
    parser.add_argument("--against", metavar="REV", help="the git revision to compare with")
    parser.add_argument("--pairs", type=int, default=15)
    parser.add_argument("--calls", type=int, default=1000, help="timed calls per side a pair")
    parser.add_argument("--serve-agent", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-echo", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_agent:
        mesh.run(serve_agent())
        return
    if args.serve_echo:
        mesh.run(serve_echo())
        return
    if not args.against:
        parser.error("--against REV is required")
    with contextlib.ExitStack() as stack:
        rev = stack.enter_context(worktree(args.against))
        before = stack.enter_context(serving("agent", rev))
        after = stack.enter_context(serving("agent", ROOT))
        echo_at = stack.enter_context(serving("echo", ROOT))
        print(f"this tree's agent against {args.against}'s; one client, {args.pairs} pairs")
        mesh.run(measure(echo_at, before, after, args.pairs, args.calls))


if __name__ == "__main__":
    main()
