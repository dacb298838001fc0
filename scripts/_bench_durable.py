"""The durable-session figures of scripts/bench: a redis-server of the bench's own, and the
time from an owner's SIGKILL to the first successful call on its new owner."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from sessionmesh import mesh
from sessionmesh.testing import eventually

CLI = [sys.executable, "-m", "sessionmesh.server._cli"]
COUNTER = str(Path(__file__).resolve().parent.parent / "examples" / "counter.py")


def _pong(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2) as s:
        s.sendall(b"PING\r\n")
        return s.recv(16).startswith(b"+PONG")
    return False


@contextlib.contextmanager
def redis_server() -> Iterator[str | None]:
    """A redis-server on a free loopback port, no persistence (a cache-like default): its
    URL, or None when redis-server is not installed (the durable figures are skipped)."""
    binary = shutil.which("redis-server")
    if binary is None:
        yield None
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    with tempfile.TemporaryDirectory(prefix="sessionmesh-bench-redis-") as root:
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", root, "--save", ""],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 10
            while not _pong(port):
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not answer within 10 s")
                time.sleep(0.02)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.kill()
            proc.wait()


async def _serve_counter(registry: str, store: str) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        *["serve", COUNTER, "--registry", registry, "--session-store", store],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    return proc, str(json.loads(await proc.stdout.readline())["instance"])


async def takeover_ms(store: str, rounds: int) -> list[float]:
    """Milliseconds from SIGKILL of a durable session's owner (two replicas, real processes)
    to the first successful call, on the other replica, with the count intact."""
    registry = await asyncio.create_subprocess_exec(
        *CLI,
        *["registry", "--port", "0"],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    took: list[float] = []
    replicas: dict[str, asyncio.subprocess.Process] = {}
    try:
        assert registry.stdout is not None
        address = json.loads(await registry.stdout.readline())["registry"]
        async with mesh.connect(registry=address) as client:
            for _ in range(rounds):
                while len(replicas) < 2:
                    proc, instance = await _serve_counter(address, store)
                    replicas[instance] = proc
                await eventually(
                    lambda: set(replicas) <= {i.instance_id for i in client.instances()},
                    within=10,
                )
                counter = client.proxy("session_counter", session_required=True, timeout=10)
                first = await counter(increment=1)
                owner = str(first["session"]).partition(".")[0]
                victim = replicas.pop(owner)
                victim.send_signal(signal.SIGKILL)
                killed = time.perf_counter()
                after = await counter(increment=1)  # goes to the other replica by itself
                took.append((time.perf_counter() - killed) * 1000)
                assert after["count"] == 2, after
                await victim.wait()
                await counter.cleanup_auto_session()
    finally:
        for proc in [*replicas.values(), registry]:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            await proc.wait()
    return took


def env_with(store: str | None) -> dict[str, str]:
    """The serving child's environment: it adds a durable agent when given a store."""
    return {"SESSIONMESH_BENCH_STORE": store} if store else {}


def store_of_env() -> str | None:
    return os.environ.get("SESSIONMESH_BENCH_STORE") or None
