"""Starting and stopping real agent processes in tests."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def serve(
    file: str, *args: str, env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[str], dict[str, Any]]]:
    """Run `sessionmesh serve FILE` and yield the process and its ready line; always stop it."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "sessionmesh.server._cli", "serve", str(ROOT / file), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the ready line; EOF if it died
        if not line:
            proc.wait(timeout=10)
            raise AssertionError(
                f"agent did not start: {proc.stderr.read() if proc.stderr else ''}"
            )
        yield proc, json.loads(line)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
