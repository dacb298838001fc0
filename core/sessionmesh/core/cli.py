"""What every ``sessionmesh`` command shares, serving or calling: the registry address,
the security flags, and how a notice reaches the person running it."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import time

from sessionmesh.core._credentials import TLS, TLS_ENV, TOKEN_ENV

__all__ = [
    "DEFAULT_REGISTRY_PORT",
    "REGISTRY_ENV",
    "TLS_ENV",
    "TOKEN_ENV",
    "iso_time",
    "metrics_option",
    "registry_address",
    "say",
    "security_options",
    "tls_from",
    "token_from",
]

REGISTRY_ENV = "SESSIONMESH_REGISTRY"
DEFAULT_REGISTRY_PORT = 50050


def iso_time(created: float | None = None) -> str:
    """A time (``time.time()``; default now) as log lines write it: ISO 8601, UTC, ms."""
    stamp = datetime.datetime.fromtimestamp(
        time.time() if created is None else created, datetime.UTC
    )
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def say(message: str) -> None:
    """A notice for the person running the command (a JSON line with --log-format json)."""
    # Whoever reads our stderr may be gone (`run` killed): a notice is never worth a crash.
    with contextlib.suppress(OSError):
        _say(message)


def _say(message: str) -> None:
    if os.environ.get("SESSIONMESH_LOG_FORMAT") == "json":
        line = json.dumps(
            {
                "time": iso_time(),
                "level": "NOTICE",
                "logger": "sessionmesh",
                "message": message,
            }
        )
        print(line, file=sys.stderr, flush=True)
    else:
        print(f"sessionmesh: {message}", file=sys.stderr, flush=True)


def registry_address(args: argparse.Namespace, *, required: bool) -> str | None:
    """--registry, else $SESSIONMESH_REGISTRY, else (if required) the default local one."""
    address: str | None = getattr(args, "registry", None) or os.environ.get(REGISTRY_ENV)
    if required and not address:
        address = f"127.0.0.1:{DEFAULT_REGISTRY_PORT}"
    return address


def security_options(p: argparse.ArgumentParser, *, serves: bool) -> None:
    """The TLS flags (each defaults to its SESSIONMESH_TLS_* variable) and --token."""
    group = p.add_argument_group("security")
    group.add_argument(
        "--tls-cert",
        metavar="FILE",
        help=f"this process's certificate chain, PEM: {'served, and ' if serves else ''}"
        f"presented as a client certificate (${TLS_ENV['cert']})",
    )
    group.add_argument(
        "--tls-key", metavar="FILE", help=f"the key of --tls-cert, PEM (${TLS_ENV['key']})"
    )
    group.add_argument(
        "--tls-ca",
        metavar="FILE",
        help=f"verify the servers we dial against this CA, PEM (${TLS_ENV['ca']}); with "
        "neither it nor --tls-cert, we dial plaintext",
    )
    if serves:
        group.add_argument(
            "--tls-client-ca",
            metavar="FILE",
            help="require client certificates from this CA: mutual TLS, and callers known "
            f"by their certificate (${TLS_ENV['client_ca']})",
        )
    group.add_argument(
        "--token",
        default=None,
        help=f"a bearer token to send with every call, over TLS only (${TOKEN_ENV})",
    )


def tls_from(args: argparse.Namespace) -> TLS | None:
    """The TLS the flags describe, each flag falling back to its environment variable."""
    return TLS.from_env(
        {
            name: getattr(args, f"tls_{field}", None) or os.environ.get(name, "")
            for field, name in TLS_ENV.items()
        }
    )


def token_from(args: argparse.Namespace) -> str | None:
    token: str | None = getattr(args, "token", None) or os.environ.get(TOKEN_ENV) or None
    return token


def metrics_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve Prometheus metrics on /metrics at this port of --host (0: a free one; "
        "needs sessionmesh[metrics])",
    )
