"""The ``sessionmesh`` command: its parser, its logging, and ``main``. What the serving
commands do is ``_commands.py``; the calling ones are the client's (``client/cli.py``)."""

from __future__ import annotations

# isort: split
# First, before anything loads gRPC: it reads its log level from the environment then.
from sessionmesh.server import _quiet  # noqa: F401

# isort: split
import argparse
import importlib.metadata
import importlib.util
import logging
import os
import sys
from collections.abc import Sequence

from sessionmesh.client import cli as client_commands
from sessionmesh.core import run as run_loop
from sessionmesh.core.cli import (
    DEFAULT_REGISTRY_PORT,
    REGISTRY_ENV,
    metrics_option,
    say,
    security_options,
)
from sessionmesh.errors import MeshError, RemoteError
from sessionmesh.server import _logs as logs
from sessionmesh.server import _mcp_command as mcp_command
from sessionmesh.server._commands import registry_command, run_command, serve_command
from sessionmesh.server._registry import LOST_AFTER
from sessionmesh.server._settings import (
    AUTH_TOKENS_ENV,
    SESSION_STORE_ENV,
)

log = logging.getLogger("sessionmesh.cli")


def serving_security(p: argparse.ArgumentParser, *, insecure: bool = True) -> None:
    """The TLS flags, --token (to dial with) and what a server accepts."""
    security_options(p, serves=True)
    group = p.add_argument_group("who may call")
    group.add_argument(
        "--auth-tokens",
        metavar="FILE",
        help="accept bearer tokens: one 'principal token' pair a line; needs TLS "
        f"(${AUTH_TOKENS_ENV})",
    )
    if insecure:
        group.add_argument(
            "--insecure",
            action="store_true",
            help="serve plaintext on an address other machines can reach (refused otherwise)",
        )


def session_store_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--session-store",
        metavar="URL",
        default=None,
        help="make sessions durable: kept in this store (redis://HOST:PORT/DB), they "
        "survive their owner and continue on another replica; needs sessionmesh[redis] "
        f"(${SESSION_STORE_ENV})",
    )
    p.add_argument(
        "--hibernate-after",
        type=float,
        default=None,
        metavar="SECONDS",
        help="with --session-store: a session idle this long leaves memory (its state is in "
        "the store) and comes back at its next call, on any replica (default: never)",
    )
    p.add_argument(
        "--max-live-sessions",
        type=int,
        default=None,
        metavar="N",
        help="at most N sessions in memory: past it the least recently used durable ones "
        "hibernate; with none to hibernate, new sessions are refused (default: no cap)",
    )


def lost_after_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--lost-after",
        type=float,
        default=None,
        metavar="SECONDS",
        help="an agent that stops answering (its connection open) is unreachable after its "
        f"1 s lease and removed, its sessions lost, after this long (default {LOST_AFTER:g})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sessionmesh", description="A gRPC session mesh for Python services."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG")
    parser.add_argument(
        "--grpc-logs",
        action="store_true",
        help="let gRPC core log to stderr at its own level (by default only its errors; "
        f"setting ${logs.GRPC_VERBOSITY_ENV} does the same)",
    )
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=os.environ.get(logs.LOG_FORMAT_ENV, "text"),
        help="log lines for people, or one JSON object a line for machines "
        f"(${logs.LOG_FORMAT_ENV}; run's agents inherit it)",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s {importlib.metadata.version('sessionmesh')}",
    )
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
        "--peer",
        action="append",
        default=[],
        metavar="CAP=HOST:PORT",
        help="where a dependency is (instead of a registry)",
    )
    serve.add_argument(
        "--registry",
        default=None,
        metavar="HOST:PORT|etcd://HOST:PORT,...",
        help="register there and resolve dependencies: a registry, or an etcd cluster "
        f"directly (default: ${REGISTRY_ENV})",
    )
    serve.add_argument(
        "--drain-timeout",
        type=float,
        default=None,
        help="on SIGTERM, seconds to wait for open sessions (default 30)",
    )
    serve.add_argument(
        "--debug", action="store_true", help="send tracebacks of failed tools to callers"
    )
    serve.add_argument(
        "--advertise",
        default=None,
        metavar="HOST[:PORT]",
        help="the address others dial, as the registry lists it (default: the bound one; "
        "needed when binding 0.0.0.0 or behind NAT)",
    )
    serve.add_argument(
        "--lost-after",
        type=float,
        default=None,
        metavar="SECONDS",
        help="with an etcd:// registry: the lease after which an agent that stopped "
        "answering is removed and its sessions lost (default 5, at least 2)",
    )
    metrics_option(serve)
    session_store_option(serve)
    serving_security(serve)
    serve.add_argument(
        "--admin",
        action="append",
        default=[],
        metavar="PRINCIPAL",
        help="a principal that sees every caller's sessions in ListSessions (repeatable)",
    )
    serve.add_argument(
        "--max-sessions-per-principal",
        type=int,
        default=None,
        metavar="N",
        help="open sessions one caller may hold on this agent (default: no cap of its own)",
    )
    serve.add_argument("--stop-with-parent", action="store_true", help=argparse.SUPPRESS)
    serve.set_defaults(run=serve_command)

    registry = commands.add_parser("registry", help="run a registry")
    registry.add_argument("--host", default="127.0.0.1")
    registry.add_argument("--port", type=int, default=DEFAULT_REGISTRY_PORT)
    lost_after_option(registry)
    metrics_option(registry)
    serving_security(registry)
    registry.add_argument(
        "--store",
        default=None,
        metavar="etcd://HOST:PORT,...",
        help="keep the instances in etcd, so that several registries serve one mesh "
        "(default: in this process's memory)",
    )
    registry.add_argument(
        "--registrants",
        metavar="FILE",
        help="who may register which agent names: 'principal name [name ...]' a line, '*' "
        "for any (default: any authenticated caller, any name)",
    )
    registry.set_defaults(run=registry_command)

    run = commands.add_parser("run", help="run agents (and a registry), each in its own process")
    run.add_argument("files", nargs="+", metavar="FILE")
    run.add_argument("--replicas", type=int, default=1, help="processes per file")
    run.add_argument(
        "--registry",
        default=None,
        metavar="HOST:PORT|etcd://HOST:PORT,...",
        help="join this registry (or etcd cluster) instead of embedding one (default: "
        f"${REGISTRY_ENV})",
    )
    run.add_argument(
        "--registry-port",
        type=int,
        default=DEFAULT_REGISTRY_PORT,
        help="port of the embedded registry",
    )
    lost_after_option(run)
    session_store_option(run)
    run.add_argument(
        "--drain-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="on Ctrl-C, how long agents wait for open sessions (default 30; Ctrl-C again "
        "stops at once)",
    )
    run.add_argument(
        "--debug", action="store_true", help="send tracebacks of failed tools to callers"
    )
    run.add_argument(
        "--host",
        default=None,
        help="address the agents bind (default 127.0.0.1; the embedded registry stays there)",
    )
    run.add_argument(
        "--advertise",
        default=None,
        metavar="HOST",
        help="the host others dial the agents at (each with its own port)",
    )
    run.add_argument(
        "--restart",
        choices=("on-failure", "always", "never"),
        default="on-failure",
        help="restart an agent process that dies: on-failure (a non-zero exit or a signal; "
        "the default), always, never; after a backoff that doubles while it keeps dying "
        "within 30 s (0.5 s to 30 s)",
    )
    run.add_argument(
        "--watch",
        action="store_true",
        help="restart a file's agents when it changes (needs watchfiles: sessionmesh[watch])",
    )
    run.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help="the embedded registry serves Prometheus metrics on PORT (0: a free one), each "
        "agent on a free port; the ready line lists them all (needs sessionmesh[metrics])",
    )
    serving_security(run)
    run.set_defaults(run=run_command)

    mcp_command.add(commands)
    client_commands.add(commands)
    for sub in commands.choices.values():
        # `sessionmesh call -v ...` as well as `sessionmesh -v call ...`.
        sub.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log at DEBUG"
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet = args.command in client_commands.COMMANDS
    logs.configure(
        args.log_format,
        logging.DEBUG if args.verbose else logging.WARNING if quiet else logging.INFO,
        grpc_logs=args.grpc_logs,
    )
    try:
        return int(run_loop(args.run(args)))
    except KeyboardInterrupt:
        return 130
    except SystemExit as exc:
        if not isinstance(exc.code, str):
            raise
        say(exc.code.removeprefix("sessionmesh: "))  # in the log format asked for
        return 1
    except MeshError as exc:
        say(str(exc))
        if isinstance(exc, RemoteError) and exc.debug:
            # The agent runs with --debug: its traceback came with the error.
            print(f"the agent's traceback:\n{exc.debug.rstrip()}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # Whoever read our output stopped (`sessionmesh list | head -1`): nothing is wrong.
        # Point stdout at /dev/null so the flush at exit does not fail a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
