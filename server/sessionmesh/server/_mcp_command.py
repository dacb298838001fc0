"""``sessionmesh mcp``: serve the MCP front door (needs ``sessionmesh[mcp]``)."""

from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
from typing import TYPE_CHECKING, Any

from sessionmesh.core.cli import (
    metrics_option,
    registry_address,
    say,
    security_options,
    tls_from,
    token_from,
)
from sessionmesh.errors import MeshError, UsageError
from sessionmesh.server._security import is_loopback

if TYPE_CHECKING:
    from sessionmesh.core import TLS

#: The environment variable --session-key falls back to.
SESSION_KEY_ENV = "SESSIONMESH_MCP_SESSION_KEY"

#: How long the front door waits for the registry's first view before serving anyway.
_FIRST_VIEW = 5.0


def add(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    p = commands.add_parser(
        "mcp", help="serve the mesh's tools to MCP clients (Streamable HTTP at /mcp)"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765, help="0: a free one")
    p.add_argument(
        "--registry",
        default=None,
        metavar="HOST:PORT",
        help="the registry, or etcd://... (default: $SESSIONMESH_REGISTRY, else 127.0.0.1:50050)",
    )
    p.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="a browser origin allowed to call (Origin header; default: loopback origins only)",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="serve plain HTTP on an address reachable from elsewhere (refused without it)",
    )
    p.add_argument(
        "--session-key",
        default=None,
        metavar="SECRET",
        help="sign the Mcp-Session-Id of handshake-era clients with this secret: give every "
        f"front door behind one balancer the same (${SESSION_KEY_ENV}; default: a key of "
        "this process's own)",
    )
    metrics_option(p)
    # As for agents: --tls-cert/--tls-key are served (HTTPS) and presented to the mesh;
    # --tls-client-ca requires client certificates from MCP clients.
    security_options(p, serves=True)
    p.set_defaults(run=mcp_command)
    return p


async def mcp_command(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from sessionmesh.server._mcp import FrontDoor, app
    except ImportError as exc:
        raise SystemExit(
            f"sessionmesh: the MCP front door needs sessionmesh[mcp] ({exc.name} is missing): "
            "pip install 'sessionmesh[mcp]'"
        ) from None
    from sessionmesh import mesh, tracing

    tracing.configure_from_env(service_name="sessionmesh-mcp")  # OTEL_EXPORTER_OTLP_ENDPOINT
    tls = tls_from(args)
    https = tls is not None and tls.serves
    if not https and not is_loopback(args.host) and not args.insecure:
        raise SystemExit(
            f"sessionmesh: {args.host} is reachable from elsewhere: serve HTTPS (--tls-cert, "
            "--tls-key), or put the front door behind a TLS-terminating proxy and pass "
            "--insecure, or bind a loopback address"
        )
    address = registry_address(args, required=True)
    assert address is not None
    client = mesh.connect(registry=address, tls=tls, token=token_from(args))
    try:
        try:
            await client.ready(within=_FIRST_VIEW)
        except MeshError as exc:
            say(f"no view of the mesh yet ({exc}); serving, tools appear as agents do")
        try:
            sock = socket.create_server((args.host, args.port))
        except OSError as exc:
            raise SystemExit(
                f"sessionmesh: the MCP front door cannot listen on {args.host}:{args.port}: "
                f"{exc.strerror}; choose another --port (0 picks a free one)"
            ) from None
        front = FrontDoor(
            client, lambda token: mesh.connect(registry=address, tls=tls, token=token)
        )
        ready = {"url": "", "registry": address}
        if args.metrics_port is not None:
            from sessionmesh.server._metrics import FrontDoorMetrics

            front.metrics = FrontDoorMetrics()
            ready["metrics"] = front.metrics.serve(
                args.host, args.metrics_port, None, insecure=args.insecure
            )
        config = uvicorn.Config(
            app(front, args.host, args.port, args.allow_origin, _session_key(args)),
            log_level="warning",
            lifespan="on",
            **_https(tls),
        )
        scheme = "https" if https else "http"
        url = ready["url"] = f"{scheme}://{args.host}:{sock.getsockname()[1]}/mcp"
        print(json.dumps(ready), flush=True)
        say(f"MCP front door serving on {url}")
        # Listening already (callers queue until uvicorn accepts); it stops on SIGINT/SIGTERM.
        try:
            await uvicorn.Server(config).serve(sockets=[sock])
        finally:
            await front.aclose()
            if front.metrics is not None:
                front.metrics.stop()
    except UsageError as exc:
        raise SystemExit(f"sessionmesh: {exc}") from None
    finally:
        await client.aclose()
    return 0


def _session_key(args: argparse.Namespace) -> bytes | None:
    key = args.session_key or os.environ.get(SESSION_KEY_ENV)
    return key.encode() if key else None


def _https(tls: TLS | None) -> dict[str, Any]:
    """uvicorn's TLS settings: the certificate served, and the CA client certificates must
    come from (mutual TLS), if given."""
    if tls is None or not tls.serves:
        return {}
    settings: dict[str, Any] = {"ssl_certfile": tls.cert, "ssl_keyfile": tls.key}
    if tls.client_ca:
        settings.update(ssl_ca_certs=tls.client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
    return settings
