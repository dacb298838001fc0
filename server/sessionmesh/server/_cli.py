"""The ``sessionmesh`` command."""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import importlib.util
import json
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from sessionmesh import tracing
from sessionmesh.client import cli as client_commands
from sessionmesh.core import TLS, Credentials
from sessionmesh.core import run as run_loop
from sessionmesh.core.cli import (
    DEFAULT_REGISTRY_PORT,
    REGISTRY_ENV,
    TOKEN_ENV,
    registry_address,
    say,
    security_options,
    tls_from,
    token_from,
)
from sessionmesh.errors import MeshError, UsageError
from sessionmesh.server._agent import Agent
from sessionmesh.server._etcd import EtcdStore
from sessionmesh.server._registry import LOST_AFTER, Registry, RegistryStore
from sessionmesh.server._settings import (
    AUTH_TOKENS_ENV,
    SESSION_STORE_ENV,
    auth_tokens_from,
    from_flags,
)
from sessionmesh.server._supervise import (
    Output,
    Signals,
    Supervisor,
    each,
    ready_line,
    spawn,
    stop_all,
    unless,
)
from sessionmesh.server._tool import each_once
from sessionmesh.wire.etcd import SCHEMES as ETCD_SCHEMES

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
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            raise  # -v: the whole traceback
        raise SystemExit(f"sessionmesh: {_where(exc, file)}: {type(exc).__name__}: {exc}") from None
    return module


def _where(exc: BaseException, file: Path) -> str:
    """``path:line`` of the failure in ``file`` (the last frame there), else the path."""
    if isinstance(exc, SyntaxError) and exc.filename and exc.lineno:
        return f"{exc.filename}:{exc.lineno}"
    line = None
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        if Path(frame.f_code.co_filename) == file:
            line = lineno
    return f"{file}:{line}" if line else str(file)


async def _serve(args: argparse.Namespace) -> int:
    module = load_file(args.file)
    try:
        agent = Agent.from_module(module, **from_flags(args))
    except UsageError as exc:
        raise SystemExit(f"sessionmesh: {args.file}: {exc}") from None
    signals = Signals()
    if args.stop_with_parent:
        # Started by `sessionmesh run`: its stdin pipe closes when `run` dies, however it
        # dies, and the agent must not outlive it.
        await asyncio.get_running_loop().connect_read_pipe(lambda: _ParentGone(signals), sys.stdin)
    try:
        if tracing.configure_from_env(service_name=agent.name):
            say(f"tracing to {os.environ.get('OTEL_EXPORTER_OTLP_ENDPOINT') or 'the console'}")
        address = await agent.start()
    except UsageError as exc:
        raise SystemExit(f"sessionmesh: {exc}") from None
    tools = sorted(b.spec.name for b in each_once(agent.tools))
    ready = {
        "agent": agent.name,
        "instance": agent.instance_id,
        "address": address,
        "tools": tools,
        "pid": os.getpid(),
        # The event loop it runs on: uvloop when installed (sessionmesh[fast]), else asyncio.
        "loop": "uvloop"
        if type(asyncio.get_running_loop()).__module__.startswith("uvloop")
        else "asyncio",
        **({"metrics": agent.metrics.address} if agent.metrics else {}),
    }
    print(json.dumps(ready), flush=True)
    say(f"agent {agent.name} (instance {agent.instance_id}) serving on {address}")
    await signals.stop.wait()
    if agent.settings.registry and not signals.hurry.is_set():
        say(
            f"agent {agent.name} draining (up to {agent.settings.drain_timeout:g} s for open "
            "sessions; again to stop now)"
        )
        await unless(signals.hurry, agent.drain())
    say(f"agent {agent.name} stopping")
    # Hurried: no grace for calls in flight; open sessions are closed and their close
    # callbacks run either way.
    await agent.stop(grace=0 if signals.hurry.is_set() else None)
    return 0


class _ParentGone(asyncio.Protocol):
    def __init__(self, signals: Signals) -> None:
        self.signals = signals

    def connection_lost(self, exc: Exception | None) -> None:
        self.signals.hurry.set()  # nobody is left to wait for a drain
        self.signals.stop.set()


# -- registry and run -------------------------------------------------------------------------


async def _registry(args: argparse.Namespace) -> int:
    try:
        registry = Registry(
            host=args.host,
            port=args.port,
            lost_after=args.lost_after or LOST_AFTER,
            tls=tls_from(args),
            insecure=args.insecure,
            auth_tokens=auth_tokens_from(args),
            registrants=args.registrants,
            store=_store(args),
            metrics_port=args.metrics_port,
        )
    except UsageError as exc:
        raise SystemExit(f"sessionmesh: {exc}") from None
    signals = Signals()
    try:
        address = await registry.start()
    except UsageError as exc:
        raise SystemExit(f"sessionmesh: {exc}") from None
    print(json.dumps({"registry": address}), flush=True)
    say(f"registry serving on {address}")
    await signals.stop.wait()
    await registry.stop()
    return 0


async def _run(args: argparse.Namespace) -> int:
    if args.replicas < 1:
        raise SystemExit("sessionmesh: --replicas must be >= 1")
    missing = [file for file in args.files if not os.path.isfile(file)]  # noqa: ASYNC240
    if missing:
        raise SystemExit(f"sessionmesh: no such file: {', '.join(missing)}")
    signals = Signals()
    registry: Registry | None = None
    address = registry_address(args, required=False)
    on_etcd = address is not None and address.partition("://")[0] in ETCD_SCHEMES
    if address is not None and args.lost_after is not None and not on_etcd:
        raise SystemExit(
            f"sessionmesh: --lost-after configures the embedded registry; the one at {address} "
            "has its own (sessionmesh registry --lost-after)"
        )
    tls = tls_from(args)
    auth_tokens = auth_tokens_from(args)
    env = _security_env(tls, token_from(args), auth_tokens)
    if address is None:
        try:
            registry = Registry(
                host="127.0.0.1",
                port=args.registry_port,
                lost_after=args.lost_after or LOST_AFTER,
                tls=tls,
                auth_tokens=auth_tokens,
                metrics_port=args.metrics_port,
            )
        except UsageError as exc:
            raise SystemExit(f"sessionmesh: {exc}") from None
        try:
            address = await registry.start()
        except UsageError as exc:
            raise SystemExit(
                f"sessionmesh: the embedded registry: {exc}. Is another `sessionmesh run` or "
                "registry running? Use --registry-port, or --registry to join it."
            ) from None
        say(f"embedded registry on {address}")
    procs: list[asyncio.subprocess.Process] = []
    agents: list[dict[str, Any]] = []
    output = Output()
    try:
        extra = ["--debug"] if args.debug else []
        if on_etcd and args.lost_after is not None:
            extra += ["--lost-after", str(args.lost_after)]  # each agent's etcd lease
        if args.host is not None:
            extra += ["--host", args.host]
        if args.advertise is not None:
            extra += ["--advertise", args.advertise]  # a host: each agent adds its own port
        if args.insecure:
            extra.append("--insecure")
        if args.metrics_port is not None:
            extra += ["--metrics-port", "0"]  # each agent its own; the ready line says where
        if args.drain_timeout is not None:
            extra += ["--drain-timeout", str(args.drain_timeout)]
        if args.session_store is not None:
            extra += ["--session-store", args.session_store]
        for file in args.files:
            for _ in range(args.replicas):
                procs.append(await spawn(file, address, extra, env, output))
        files = {
            proc: file for proc, file in zip(procs, each(args.files, args.replicas), strict=True)
        }
        for proc in procs:
            agents.append(await ready_line(proc))
            output.ready(proc, agents[-1])
        ready: dict[str, Any] = {"registry": address, "agents": agents}
        if registry is not None and registry.metrics is not None:
            ready["registry_metrics"] = registry.metrics.address
        print(json.dumps(ready), flush=True)
        say(f"{len(agents)} agent process(es) up; Ctrl-C stops everything")
        supervisor = Supervisor(
            files,
            procs,
            lambda f: spawn(f, address, extra, env, output),
            output,
            policy=args.restart,
            watch=args.watch,
        )
        await supervisor.run(signals)
    finally:
        await stop_all(procs, signals)
        await output.aclose()
        if registry is not None:
            await registry.stop()
    return 0


def _store(args: argparse.Namespace) -> RegistryStore | None:
    if args.store is None:
        return None
    credentials = Credentials(tls_from(args), None)
    return EtcdStore(args.store, credentials, ttl=args.lost_after or LOST_AFTER)


def _security_env(tls: TLS | None, token: str | None, auth_tokens: str | None) -> dict[str, str]:
    """The agents `run` starts get its security through the environment (`serve` reads it)."""
    env = tls.env() if tls is not None else {}
    if token:
        env[TOKEN_ENV] = token
    if auth_tokens:
        env[AUTH_TOKENS_ENV] = os.path.abspath(auth_tokens)
    return env


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


def metrics_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve Prometheus metrics on /metrics at this port of --host (0: a free one; "
        "needs sessionmesh[metrics])",
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
        "--log-format",
        choices=("text", "json"),
        default=os.environ.get(LOG_FORMAT_ENV, "text"),
        help=f"log lines for people, or one JSON object a line for machines (${LOG_FORMAT_ENV}; "
        "run's agents inherit it)",
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
    serve.set_defaults(run=_serve)

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
    registry.set_defaults(run=_registry)

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
    run.set_defaults(run=_run)

    client_commands.add(commands)
    return parser


LOG_FORMAT_ENV = "SESSIONMESH_LOG_FORMAT"


class _JsonLines(logging.Formatter):
    """One JSON object a line: time, level, logger, message (and the traceback, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet = args.command in client_commands.COMMANDS
    os.environ[LOG_FORMAT_ENV] = args.log_format  # what run's agents log in, too
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        _JsonLines()
        if args.log_format == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING if quiet else logging.INFO,
        handlers=[handler],
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
        return 1
    except BrokenPipeError:
        # Whoever read our output stopped (`sessionmesh list | head -1`): nothing is wrong.
        # Point stdout at /dev/null so the flush at exit does not fail a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
