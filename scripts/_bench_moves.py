"""The figures of sessions that move (scripts/bench --moves), as processes on loopback:

1. drain: 300 sessions under load on three counter replicas; the replica holding the most
   is SIGTERMed. Failed calls, counts against acknowledged increments, the time from SIGTERM
   to the process's exit, and each moved session's pause (its slowest call while the move
   ran) against the slowest call of a session that stayed.
2. hibernation: 20,000 durable sessions with 1 KB of state each, then idle past
   --hibernate-after: the agent's RSS before, with them, after; then waking some (a call).
3. the cap: --max-live-sessions 1000 under a sweep of 10,000 sessions: the most ever live.

Each figure is the median of several runs with its spread (min-max)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

from _bench_durable import redis_server

from sessionmesh import mesh
from sessionmesh.testing import eventually

CLI = [sys.executable, "-m", "sessionmesh.server._cli"]
ROOT = Path(__file__).resolve().parent.parent
COUNTER = str(ROOT / "examples" / "counter.py")
#: --hibernate-after of the hibernation figures (seconds).
IDLE = 40
FILLER = str(Path(__file__).resolve().parent / "_bench_filler.py")


@contextlib.asynccontextmanager
async def process(*args: str) -> AsyncIterator[tuple[asyncio.subprocess.Process, dict[str, str]]]:
    """`sessionmesh ARGS`, its ready line (with "log": the file its stderr goes to)."""
    with tempfile.NamedTemporaryFile(prefix="sessionmesh-bench-", suffix=".log") as log:
        proc = await asyncio.create_subprocess_exec(
            *CLI, *args, stdout=asyncio.subprocess.PIPE, stderr=log
        )
        try:
            assert proc.stdout is not None
            ready = json.loads(await proc.stdout.readline())
            yield proc, {**ready, "log": log.name}
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


_PAUSED = re.compile(r"in (\d+) ms; each paused p50 ([\d.]+) ms, p99 ([\d.]+) ms")


def spread(values: list[float], unit: str = "") -> str:
    return (
        f"{statistics.median(values):.1f}{unit} "
        f"({min(values):.1f}-{max(values):.1f}{unit}, {len(values)} runs)"
    )


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


# -- 1. drain under load -----------------------------------------------------------------------


async def drain_once(sessions: int) -> dict[str, float]:
    async with contextlib.AsyncExitStack() as stack:
        _, reg = await stack.enter_async_context(process("registry", "--port", "0"))
        address = reg["registry"]
        replicas = [
            await stack.enter_async_context(process("serve", COUNTER, "--registry", address))
            for _ in range(3)
        ]
        client = await stack.enter_async_context(mesh.connect(registry=address))
        await eventually(
            lambda: len([i for i in client.instances() if i.agent_name == "counter"]) == 3,
            within=10,
        )
        proxies = [client.proxy("session_counter", session_required=True) for _ in range(sessions)]
        acknowledged = [0] * sessions
        owners: list[str] = []
        for p in proxies:
            owners.append(str((await p(increment=1))["session"]).partition(".")[0])
            acknowledged[len(owners) - 1] = 1
        victim_id = max(set(owners), key=owners.count)
        victim, said = next((p, r) for p, r in replicas if r["instance"] == victim_id)
        stop = asyncio.Event()
        failed = 0
        window: list[float] = [0.0, 0.0]  # the move's span: SIGTERM .. exit
        slowest = [0.0] * sessions  # each session's slowest call that overlapped the window

        async def load(i: int) -> None:
            nonlocal failed
            rng = random.Random(i)
            while not stop.is_set():
                step = rng.randint(1, 3)
                began = time.perf_counter()
                try:
                    reply = await proxies[i](increment=step)
                except Exception:
                    failed += 1
                    return
                ended = time.perf_counter()
                acknowledged[i] += step
                assert reply["count"] == acknowledged[i]
                if window[0] and began <= (window[1] or ended) and ended >= window[0]:
                    slowest[i] = max(slowest[i], ended - began)

        tasks = [asyncio.create_task(load(i)) for i in range(sessions)]
        await asyncio.sleep(1.0)
        window[0] = time.perf_counter()
        victim.send_signal(signal.SIGTERM)
        await victim.wait()
        window[1] = time.perf_counter()
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*tasks)
        exact = 0
        for i, p in enumerate(proxies):
            exact += (await p(increment=0))["count"] == acknowledged[i]
        paused = _PAUSED.search(await asyncio.to_thread(Path(said["log"]).read_text))
        assert paused is not None, "the stopped agent did not say what it moved"
        moved = [slowest[i] * 1000 for i in range(sessions) if owners[i] == victim_id]
        stayed = [slowest[i] * 1000 for i in range(sessions) if owners[i] != victim_id]
        return {
            "failed": failed,
            "inexact": sessions - exact,
            "moved": len(moved),
            "exit_ms": (window[1] - window[0]) * 1000,
            "moved_p99_ms": percentile(moved, 0.99),
            "handover_ms": float(paused[1]),
            "pause_p50_ms": float(paused[2]),
            "pause_p99_ms": float(paused[3]),
            "stayed_p99_ms": percentile(stayed, 0.99),
        }


# -- 2. hibernation, 3. the cap ------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def hibernation_once(store: str, sessions: int, wake: int) -> dict[str, float]:
    # Long enough for every session to be in memory at once before the first one leaves.
    args = ("serve", FILLER, "--session-store", store, "--hibernate-after", str(IDLE))
    async with process(*args) as (proc, ready), mesh.connect(ready["address"]) as client:
        proxy = client.proxy("fill")
        # Warm up as the fill will run (its threads, its store connections: what the agent
        # keeps whatever its sessions), so that "before" is the agent without sessions.
        warm = await _fill(proxy, 1000)
        for start in range(0, len(warm), 100):
            await asyncio.gather(*(proxy.close_session(s) for s in warm[start : start + 100]))
        before = rss_mb(proc.pid)
        ids = await _fill(proxy, sessions)
        full = rss_mb(proc.pid)
        listing = client.proxy("fill")
        live = len((await listing._transport.pick().list_sessions(5)).sessions)
        await eventually(lambda: _none_live(listing), within=60, what="every session hibernated")
        await asyncio.sleep(2.0)  # the agent gives memory back a second after the last one
        after = rss_mb(proc.pid)
        woke: list[float] = []
        for sid in random.Random(1).sample(ids, wake):
            began = time.perf_counter()
            assert await proxy.call_with_session(session_id=sid, size=0) == 1024
            woke.append((time.perf_counter() - began) * 1000)
        return {
            "before_mb": before,
            "full_mb": full,
            "after_mb": after,
            "given_back": (full - after) / (full - before),
            "live": live,
            "wake_p50_ms": statistics.median(woke),
            "wake_p99_ms": percentile(woke, 0.99),
        }


async def _fill(proxy: mesh.Proxy, sessions: int) -> list[str]:
    """Open ``sessions`` sessions, 100 at a time, each keeping 1 KB."""
    ids: list[str] = []
    for start in range(0, sessions, 100):
        opened = await asyncio.gather(
            *(proxy.create_session() for _ in range(min(100, sessions - start)))
        )
        await asyncio.gather(*(proxy.call_with_session(session_id=s, size=1024) for s in opened))
        ids += opened
    return ids


async def _none_live(proxy: mesh.Proxy) -> bool:
    return not (await proxy._transport.pick().list_sessions(5)).sessions


async def cap_once(store: str, sessions: int, cap: int) -> int:
    args = ("serve", FILLER, "--session-store", store, "--max-live-sessions", str(cap))
    async with process(*args) as (_, ready), mesh.connect(ready["address"]) as client:
        proxy = client.proxy("fill")
        most = 0
        for start in range(0, sessions, 100):
            opened = await asyncio.gather(*(proxy.create_session() for _ in range(100)))
            await asyncio.gather(
                *(proxy.call_with_session(session_id=s, size=1024) for s in opened)
            )
            listing = await proxy._transport.pick().list_sessions(5)
            most = max(most, len(listing.sessions))
            del start
        return most


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--sessions", type=int, default=300)
    parser.add_argument("--hibernating", type=int, default=20_000, help="0: no hibernation")
    args = parser.parse_args()
    if args.runs:  # 0: the hibernation figures only
        drains = [await drain_once(args.sessions) for _ in range(args.runs)]
        print(f"drain, {args.sessions} sessions under load on 3 replicas, the fullest SIGTERMed:")
        print(
            f"  failed calls: {sum(d['failed'] for d in drains)} in all; counts not exact: "
            f"{sum(d['inexact'] for d in drains)}; sessions moved per run: "
            f"{spread([d['moved'] for d in drains])}"
        )
        print(f"  SIGTERM to exit: {spread([d['exit_ms'] for d in drains], ' ms')}")
        handover = spread([d["handover_ms"] for d in drains], " ms")
        print(f"  every hand-over, as the agent timed it: {handover}")
        print(
            f"  each session held (no call of it can run): p50 "
            f"{spread([d['pause_p50_ms'] for d in drains], ' ms')}, p99 "
            f"{spread([d['pause_p99_ms'] for d in drains], ' ms')}"
        )
        moved = spread([d["moved_p99_ms"] for d in drains], " ms")
        stayed = spread([d["stayed_p99_ms"] for d in drains], " ms")
        print(f"  moved sessions' slowest call, p99: {moved}")
        print(f"  the others' slowest call, p99: {stayed}")
    if not args.hibernating:
        return
    with redis_server() as store:
        if store is None:
            print("hibernation: skipped (no redis-server)")
            return
        runs = [await hibernation_once(store, args.hibernating, 200) for _ in range(3)]
        print(f"hibernation, {args.hibernating} durable sessions of 1 KB, idle past {IDLE} s:")
        print(f"  live at once: {spread([r['live'] for r in runs])}")
        print(
            f"  agent RSS: before {spread([r['before_mb'] for r in runs], ' MB')}, with them "
            f"{spread([r['full_mb'] for r in runs], ' MB')}, after "
            f"{spread([r['after_mb'] for r in runs], ' MB')}"
        )
        print(f"  given back: {spread([r['given_back'] * 100 for r in runs], '%')}")
        print(
            f"  waking one (a call): p50 {spread([r['wake_p50_ms'] for r in runs], ' ms')}, "
            f"p99 {spread([r['wake_p99_ms'] for r in runs], ' ms')}"
        )
        peaks = [await cap_once(store, 10_000, 1000) for _ in range(3)]
        print(f"cap 1000, a sweep of 10,000 sessions: most ever live {spread(peaks)}")


if __name__ == "__main__":
    asyncio.run(main())
