"""Starting and stopping real agent and registry processes in tests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

from sessionmesh.v1 import session_service_pb2 as pb
from sessionmesh.v1 import session_service_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "sessionmesh.server._cli"]


def free_port() -> int:
    """A port that was free a moment ago (for a registry that must come back on it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def process(
    *args: str, env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[str], dict[str, Any]]]:
    """Run `sessionmesh ARGS...`, yield it and its JSON ready line; always stop it."""
    proc = subprocess.Popen(
        [*CLI, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        start_new_session=True,  # its own process group: cleanup reaches its children too
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the ready line; EOF if it died
        if not line:
            proc.wait(timeout=10)
            raise AssertionError(
                f"{args} did not start: {proc.stderr.read() if proc.stderr else ''}"
            )
        yield proc, json.loads(line)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def serve(
    file: str, *args: str, env: dict[str, str] | None = None
) -> contextlib.AbstractContextManager[tuple[subprocess.Popen[str], dict[str, Any]]]:
    """Run `sessionmesh serve FILE ARGS...`."""
    return process("serve", str(ROOT / file), *args, env=env)


def registry(
    port: int,
) -> contextlib.AbstractContextManager[tuple[subprocess.Popen[str], dict[str, Any]]]:
    return process("registry", "--port", str(port))


async def open_sessions(address: str) -> int:
    """How many sessions the agent at ``address`` has open (ListSessions)."""
    async with grpc.aio.insecure_channel(address) as channel:
        listing = await pb_grpc.SessionServiceStub(channel).ListSessions(
            pb.ListSessionsRequest(), timeout=5
        )
    return len(listing.sessions)
