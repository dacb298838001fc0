"""Starting and stopping real agent and registry processes in tests.

Every wait is bounded; async tests never block the event loop on a pipe or a process.
Each process gets its own process group, and leaving the block kills the whole group.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sessionmesh import mesh

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "sessionmesh.server._cli"]
#: How long a process may take to print its ready line.
READY_WITHIN = 30.0

Ready = dict[str, Any]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def system_tool(name: str, package: str) -> str:
    """The path of a program the distribution installs (``scripts/test`` does, as root): a
    missing one fails the run in CI, which must prove what needs it, and skips elsewhere."""
    found = shutil.which(name)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed (scripts/test installs the {package} package)")
        pytest.skip(f"{name} is not installed (apt-get install {package})")
    return found


def _failed(args: tuple[str, ...], stderr: Any) -> AssertionError:
    stderr.seek(0)
    return AssertionError(f"{args} did not start: {stderr.read().decode(errors='replace')}")


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


@contextlib.asynccontextmanager
async def process(
    *args: str, env: dict[str, str] | None = None
) -> AsyncIterator[tuple[asyncio.subprocess.Process, Ready]]:
    """Run `sessionmesh ARGS...`, yield it and its JSON ready line; always stop it."""
    with tempfile.TemporaryFile() as stderr:  # a file never fills up and blocks the child
        proc = await asyncio.create_subprocess_exec(
            *CLI,
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        try:
            assert proc.stdout is not None
            try:
                line = await asyncio.wait_for(proc.stdout.readline(), READY_WITHIN)
            except TimeoutError:
                line = b""
            if not line:
                raise _failed(args, stderr)
            yield proc, json.loads(line)
        finally:
            _kill_group(proc.pid)
            await asyncio.wait_for(proc.wait(), 10)


@contextlib.contextmanager
def process_blocking(
    *args: str, log: Path | None = None
) -> Iterator[tuple[subprocess.Popen[str], Ready]]:
    """`process` for tests without an event loop; its stderr goes to ``log`` if given (a
    test reads what it said there)."""
    with log.open("w+b") if log is not None else tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(
            [*CLI, *args], stdout=subprocess.PIPE, stderr=stderr, text=True, start_new_session=True
        )
        try:
            assert proc.stdout is not None
            with selectors.DefaultSelector() as ready:
                ready.register(proc.stdout, selectors.EVENT_READ)
                line = proc.stdout.readline() if ready.select(READY_WITHIN) else ""
            if not line:
                raise _failed(args, stderr)
            yield proc, json.loads(line)
        finally:
            _kill_group(proc.pid)
            proc.wait(timeout=10)
            proc.stdout.close()  # type: ignore[union-attr]


def serve(
    file: str, *args: str, env: dict[str, str] | None = None
) -> contextlib.AbstractAsyncContextManager[tuple[asyncio.subprocess.Process, Ready]]:
    """Run `sessionmesh serve FILE ARGS...`."""
    return process("serve", str(ROOT / file), *args, env=env)


@contextlib.asynccontextmanager
async def registry(
    port: int = 0, *args: str
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """Run `sessionmesh registry` (on a port the OS picks, unless one is given)."""
    async with process("registry", "--port", str(port), *args) as (proc, ready):
        yield proc, str(ready["registry"])


async def exited(proc: asyncio.subprocess.Process, within: float = 10.0) -> int:
    """Its exit code, once it has exited (bounded)."""
    return await asyncio.wait_for(proc.wait(), within)


def wait_until(check: Callable[[], bool], *, within: float, what: str) -> None:
    """``testing.eventually`` for tests without an event loop: poll, bounded."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not hold within {within} s")
        time.sleep(0.01)


async def open_sessions(address: str) -> int:
    """How many sessions the agent at ``address`` has open (ListSessions)."""
    async with mesh.connect(address) as agent:
        return len((await agent.list_sessions()).sessions)
