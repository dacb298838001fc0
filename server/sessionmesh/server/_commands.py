"""What the serving commands do: ``serve`` one file's agent, run a ``registry``, ``run``
agents as supervised processes. The parser that reaches them is ``_cli.py``."""

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
from pathlib import Path
from types import ModuleType
from typing import Any

from sessionmesh import tracing
from sessionmesh.core import TLS, Credentials
from sessionmesh.core.cli import (
    TOKEN_ENV,
    registry_address,
    say,
    tls_from,
    token_from,
)
from sessionmesh.errors import UsageError
from sessionmesh.server import _logs as logs
from sessionmesh.server._agent import Agent
from sessionmesh.server._etcd import EtcdStore
from sessionmesh.server._registry import LOST_AFTER, Registry, RegistryStore
from sessionmesh.server._settings import (
    AUTH_TOKENS_ENV,
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

#: How long serve waits for its registration before it prints its ready line anyway.
REGISTER_WITHIN = 5.0


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


async def serve_command(args: argparse.Namespace) -> int:
    module = load_file(args.file)
    try:
        agent = Agent.from_module(module, **from_flags(args))
    except UsageError as exc:
        raise SystemExit(f"sessionmesh: {args.file}: {exc}") from None
    logs.context.update(agent=agent.name, instance=agent.instance_id)
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
    try:
        await _serving(agent, address, signals)
    finally:
        # Whatever ended serving (a parent gone with the pipe it reads our output from,
        # say), the agent stops: left running, its gRPC tasks would absorb the loop's last
        # cancellations and the process would never exit.
        say(f"agent {agent.name} stopping")
        # Hurried: no grace for calls in flight; open sessions are closed and their close
        # callbacks run either way.
        await agent.stop(grace=0 if signals.hurry.is_set() else None)
    return 0


async def _serving(agent: Agent, address: str, signals: Signals) -> None:
    """Say that the agent serves (the ready line, for whoever started it), and serve until
    told to stop, draining first when it has a registry and is not in a hurry."""
    tools = sorted(b.spec.name for b in each_once(agent.tools))
    # The ready line means callers can find it: with a registry, once it is registered
    # (or, after a while, with "registered": false: the warnings say why).
    registered = await agent.registered(within=REGISTER_WITHIN)
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
        **({"registered": registered} if agent.settings.registry else {}),
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


class _ParentGone(asyncio.Protocol):
    def __init__(self, signals: Signals) -> None:
        self.signals = signals

    def connection_lost(self, exc: Exception | None) -> None:
        self.signals.hurry.set()  # nobody is left to wait for a drain
        self.signals.stop.set()


# -- registry and run -------------------------------------------------------------------------


async def registry_command(args: argparse.Namespace) -> int:
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
    try:
        print(json.dumps({"registry": address}), flush=True)
        say(f"registry serving on {address}")
        await signals.stop.wait()
    finally:  # whatever ended serving, the registry stops (see serve_command)
        await registry.stop()
    return 0


async def run_command(args: argparse.Namespace) -> int:
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
        elif args.watch:
            # Reload at once on a save: a drain would hold the old code for as long as a
            # session stays open (its sessions close; the new code starts with none).
            extra += ["--drain-timeout", "0"]
        if args.session_store is not None:
            extra += ["--session-store", args.session_store]
        if args.hibernate_after is not None:
            extra += ["--hibernate-after", str(args.hibernate_after)]
        if args.max_live_sessions is not None:
            extra += ["--max-live-sessions", str(args.max_live_sessions)]
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
