"""What the client and the server share and neither owns: how to dial and serve securely
(``TLS``, ``Credentials``), what a dependency and a proxy's options are, the event loop a
sessionmesh process runs on, and the CLI's common flags. Errors are ``sessionmesh.errors``;
tracing is ``sessionmesh.tracing``."""

from __future__ import annotations

from sessionmesh.core._credentials import TLS, Credentials
from sessionmesh.core._dependency import Dependency
from sessionmesh.core._loop import run
from sessionmesh.core._options import ProxyOptions

__all__ = ["TLS", "Credentials", "Dependency", "ProxyOptions", "publish", "run"]


def publish(module: str, *names: object) -> None:
    """Show classes by the public module that exports them (``Proxy`` of the client package),
    not the private one that defines them, in reprs and tracebacks."""
    for value in names:
        if isinstance(value, type):
            value.__module__ = module


publish(__name__, TLS, Credentials, Dependency, ProxyOptions)
