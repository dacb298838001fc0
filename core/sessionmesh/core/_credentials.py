"""How this process proves who it is and checks whom it dials: TLS files and a bearer token.

One :class:`TLS` describes both sides of a process: the certificate it serves and presents
as a client, the CA it trusts for the servers it dials, and (for what it serves) the CA its
clients' certificates must come from. The same four settings exist as CLI flags and as
``SESSIONMESH_TLS_*`` variables, so ``sessionmesh run`` hands them to its children.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc

from sessionmesh.errors import UsageError
from sessionmesh.wire.etcd import EtcdAddressError, EtcdTarget
from sessionmesh.wire.etcd import channel_options as etcd_channel_options

#: The environment variables, by TLS field; ``SESSIONMESH_TOKEN`` is the bearer token.
TLS_ENV = {
    "cert": "SESSIONMESH_TLS_CERT",
    "key": "SESSIONMESH_TLS_KEY",
    "ca": "SESSIONMESH_TLS_CA",
    "client_ca": "SESSIONMESH_TLS_CLIENT_CA",
}
TOKEN_ENV = "SESSIONMESH_TOKEN"


@dataclasses.dataclass(frozen=True)
class TLS:
    """PEM files: ``cert`` + ``key`` (this process's certificate chain and key: served, and
    presented as a client certificate), ``ca`` (verify the servers we dial; the system's
    roots when left out) and ``client_ca`` (require client certificates from this CA on what
    we serve: mutual TLS).

    Example::

        tls = mesh.TLS(cert="agent.pem", key="agent.key", ca="ca.pem", client_ca="ca.pem")
        async with mesh.connect(registry="10.0.0.5:50050", tls=tls) as client: ...
    """

    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    client_ca: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise UsageError(
                "TLS needs a certificate and its key together: give both --tls-cert and "
                "--tls-key (cert= and key=), or neither"
            )
        for field, path in self._files():
            if not Path(path).is_file():
                flag = "--tls-" + field.replace("_", "-")
                raise UsageError(f"{flag} {path}: no such file (a PEM file is expected)")

    def _files(self) -> list[tuple[str, str]]:
        return [(f.name, v) for f in dataclasses.fields(self) if (v := getattr(self, f.name))]

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TLS | None:
        """The TLS the ``SESSIONMESH_TLS_*`` variables describe, or None if none is set."""
        env = os.environ if environ is None else environ
        values = {field: env.get(name) or None for field, name in TLS_ENV.items()}
        return cls(**values) if any(values.values()) else None

    def env(self) -> dict[str, str]:
        """The variables that describe this TLS (for a child process)."""
        return {TLS_ENV[field]: str(Path(path).resolve()) for field, path in self._files()}

    @property
    def serves(self) -> bool:
        """Whether this is enough to serve TLS (a certificate and its key)."""
        return self.cert is not None

    def read(self, field: str) -> bytes | None:
        path = getattr(self, field)
        return Path(path).read_bytes() if path else None


@dataclasses.dataclass(frozen=True)
class Credentials:
    """What a client dials with: TLS (None: plaintext) and a bearer token for every call."""

    tls: TLS | None = None
    token: str | None = None

    def __post_init__(self) -> None:
        if self.token is not None and self.tls is None:
            raise UsageError(
                "a bearer token is sent only over TLS, never in plaintext: give tls= "
                "(--tls-ca, to verify the server) along with the token"
            )
        if self.token is not None and (not self.token or any(c.isspace() for c in self.token)):
            raise UsageError("the bearer token is empty or contains whitespace")

    def channel(self, address: str, options: Sequence[tuple[str, Any]]) -> grpc.aio.Channel:
        tls = self.tls
        if tls is None:
            return grpc.aio.insecure_channel(address, options=options)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=tls.read("ca"),
            private_key=tls.read("key"),
            certificate_chain=tls.read("cert"),
        )
        if self.token is not None:
            # gRPC's own call credentials: the header goes with every call, and only over a
            # secure channel (grpc refuses to attach them to a plaintext one).
            credentials = grpc.composite_channel_credentials(
                credentials, grpc.access_token_call_credentials(self.token)
            )
        return grpc.aio.secure_channel(address, credentials, options=options)

    def etcd_channel(self, target: EtcdTarget) -> grpc.aio.Channel:
        """A channel to an etcd cluster: over TLS with these credentials for etcds://,
        plaintext for etcd://; gRPC fails over between its members."""
        dial = self if target.secure else PLAINTEXT
        try:
            where = target.grpc_target()
        except EtcdAddressError as exc:
            raise UsageError(str(exc)) from None
        return dial.channel(where, etcd_channel_options())


PLAINTEXT = Credentials()
