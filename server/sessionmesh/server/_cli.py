"""The ``sessionmesh`` command."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from sessionmesh.server._agent import Agent

log = logging.getLogger("sessionmesh.cli")


def load_file(path: str) -> ModuleType:
    """Import a Python file as a module named after it (its folder goes on sys.path)."""
    file = Path(path).resolve()
    if not file.is_file():
        raise SystemExit(f"sessionmesh: no such file: {path}")
    sys.path.insert(0, str(file.parent))
    spec = importlib.util.spec_from_file_location(file.stem, file)
    if spec is None or spec.loader is None:
        raise SystemExit(f"sessionmesh: cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[file.stem] = module
    spec.loader.exec_module(module)
    return module


def _peers(items: Sequence[str]) -> dict[str, str]:
    peers: dict[str, str] = {}
    for item in items:
        capability, sep, address = item.partition("=")
        if not sep or not capability or not address:
            raise SystemExit(f"sessionmesh: --peer takes CAPABILITY=HOST:PORT, got {item!r}")
        peers[capability] = address
    return peers


async def _serve(args: argparse.Namespace) -> int:
    module = load_file(args.file)
    try:
        agent = Agent.from_module(
            module,
            name=args.name,
            host=args.host,
            port=args.port,
            debug=args.debug or None,
            session_ttl=args.session_ttl,
            peers=_peers(args.peer) or None,
        )
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"sessionmesh: {args.file}: {exc}") from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    address = await agent.start()
    tools = sorted({b.spec.name for b in agent.tools.values()})
    print(
        json.dumps(
            {"agent": agent.name, "instance": agent.instance_id, "address": address, "tools": tools}
        ),
        flush=True,
    )
    print(f"sessionmesh: agent {agent.name} serving on {address}", file=sys.stderr, flush=True)
    await stop.wait()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)  # a second Ctrl-C ends at once
    print(
        f"sessionmesh: agent {agent.name} stopping (grace {agent.grace} s)",
        file=sys.stderr,
        flush=True,
    )
    await agent.stop()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sessionmesh", description="A gRPC session mesh for Python services."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the tools of one Python file")
    serve.add_argument("file", help="a Python file with @mesh.tool functions")
    serve.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port to bind (default: a free one)")
    serve.add_argument(
        "--name", default=None, help="agent name (default: @mesh.agent's, or the file's)"
    )
    serve.add_argument(
        "--session-ttl", type=float, default=None, help="idle seconds before a session expires"
    )
    serve.add_argument(
        "--peer", action="append", default=[], metavar="CAP=HOST:PORT", help="where a dependency is"
    )
    serve.add_argument(
        "--debug", action="store_true", help="send tracebacks of failed tools to callers"
    )
    serve.set_defaults(run=_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    runner: Any = args.run
    try:
        return int(asyncio.run(runner(args)))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
