"""What the client and the server share and neither owns: how to dial and serve securely
(``TLS``, ``Credentials``), what a dependency and a proxy's options are, the event loop a
sessionmesh process runs on, and the CLI's common flags. Errors are ``sessionmesh.errors``;
tracing is ``sessionmesh.tracing``."""

from __future__ import annotations

from sessionmesh.core._credentials import TLS, Credentials
from sessionmesh.core._dependency import Dependency
from sessionmesh.core._loop import run
from sessionmesh.core._options import ProxyOptions

__all__ = ["TLS", "Credentials", "Dependency", "ProxyOptions", "run"]
