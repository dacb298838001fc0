"""What a server accepts: TLS on its port, plaintext only where nobody else can reach it,
and who each caller is (its client certificate, a bearer token, or a verifier's word)."""

from __future__ import annotations

import dataclasses
import hmac
import inspect
import ipaddress
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import grpc

from sessionmesh.core import TLS
from sessionmesh.errors import UsageError
from sessionmesh.server._errors import Fail
from sessionmesh.wire.reasons import Reason


@dataclasses.dataclass(frozen=True, slots=True)
class Peer:
    """What a verifier knows of the caller besides its metadata."""

    #: ``ipv4:127.0.0.1:50312`` and the like, as gRPC reports it.
    address: str
    #: The identity of its verified client certificate (URI SAN, else DNS SAN, else CN),
    #: or None without one.
    certificate: str | None
    #: gRPC's auth context of the connection (``x509_*``, ``peer_*`` keys), for the rest.
    auth_context: Mapping[str, Any]


#: ``verify(metadata, peer)``: the caller's principal, None for "not authenticated", or
#: raise PermissionError to refuse a caller it knows. May be async.
Verifier = Callable[[Mapping[str, str], Peer], "Awaitable[str | None] | str | None"]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name, or "" / "0.0.0.0" style wildcards: reachable from elsewhere


def bind(server: grpc.aio.Server, host: str, port: int, tls: TLS | None, *, insecure: bool) -> int:
    """Add the server's port: TLS when it has a certificate, plaintext only on loopback
    (or when ``insecure`` says so). Returns the port bound."""
    address = f"{host}:{port}"
    if tls is not None and tls.serves:
        return _listening(address, lambda: server.add_secure_port(address, server_credentials(tls)))
    if tls is not None and tls.client_ca:
        raise UsageError(
            "--tls-client-ca asks for mutual TLS, which needs this server's own certificate: "
            "give --tls-cert and --tls-key too"
        )
    if not is_loopback(host) and not insecure:
        raise UsageError(
            f"{host} can be reached from other machines, and without TLS anyone there could "
            "read and forge calls: give --tls-cert and --tls-key (tls=mesh.TLS(cert=..., "
            "key=...)), or pass --insecure (insecure=True) to serve plaintext anyway"
        )
    return _listening(address, lambda: server.add_insecure_port(address))


def _listening(address: str, add_port: Callable[[], int]) -> int:
    try:
        return add_port()
    except RuntimeError:  # grpc says only "Failed to bind" (its log says why)
        raise UsageError(
            f"cannot listen on {address}: the port is in use (another process listens "
            "there), or the host is not an address of this machine; choose another port "
            "(0 picks a free one)"
        ) from None


def server_credentials(tls: TLS) -> grpc.ServerCredentials:
    key, cert = tls.read("key"), tls.read("cert")
    assert key is not None
    assert cert is not None
    client_ca = tls.read("client_ca")
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def read_tokens(source: str | Mapping[str, str]) -> dict[str, str]:
    """``principal -> token`` from a mapping or a file of ``principal token`` lines
    (``#`` comments and blank lines ignored)."""
    if isinstance(source, Mapping):
        pairs = list(source.items())
    else:
        path = Path(source)
        try:
            text = path.read_text()
        except OSError as exc:
            raise UsageError(f"--auth-tokens {source}: {exc.strerror}") from None
        pairs = []
        for n, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            fields = line.split()
            if len(fields) != 2:
                raise UsageError(
                    f"--auth-tokens {source}, line {n}: expected 'principal token', "
                    f"got {len(fields)} field(s)"
                )
            pairs.append((fields[0], fields[1]))
    tokens: dict[str, str] = {}
    seen: set[str] = set()
    for principal, token in pairs:
        if len(token) < 16:
            raise UsageError(
                f"the token of {principal!r} is shorter than 16 characters: use a random one, "
                "e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
            )
        if token in seen:
            raise UsageError(f"two principals share one token ({principal!r} is one of them)")
        seen.add(token)
        tokens[principal] = token
    return tokens


def read_registrants(path: str) -> dict[str, frozenset[str]]:
    """``principal -> agent names`` from a file of ``principal name [name ...]`` lines
    (``*`` for any name; ``#`` comments and blank lines ignored)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise UsageError(f"--registrants {path}: {exc.strerror}") from None
    allowed: dict[str, frozenset[str]] = {}
    for n, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) < 2:
            raise UsageError(f"--registrants {path}, line {n}: expected 'principal agent-name ...'")
        allowed[fields[0]] = allowed.get(fields[0], frozenset()) | frozenset(fields[1:])
    return allowed


def certificate_principal(auth: Mapping[str, Any]) -> str | None:
    """The identity a verified client certificate carries: URI SAN (a SPIFFE id, say),
    else DNS SAN, else the subject's CN."""
    for key in ("peer_uri", "peer_dns", "x509_common_name"):
        values = auth.get(key)
        if values and values[0]:
            return bytes(values[0]).decode()
    return None


class Authenticator:
    """Who is calling, for a server that requires to know. Without tokens, a verifier or a
    client CA it is off, and every caller is the anonymous principal ``""``."""

    @classmethod
    def serving(
        cls,
        tls: TLS | None,
        auth_tokens: str | Mapping[str, str] | None,
        authenticate: Verifier | None,
        admins: Iterable[str] = (),
    ) -> Authenticator:
        """What a server (agent, registry) with these settings accepts; tokens need TLS."""
        tokens = read_tokens(auth_tokens) if auth_tokens is not None else None
        if tokens and not (tls is not None and tls.serves):
            raise UsageError(
                "auth_tokens (--auth-tokens) need TLS: a bearer token sent in plaintext can be "
                "read off the wire; give --tls-cert and --tls-key"
            )
        return cls(
            tokens=tokens,
            verify=authenticate,
            certificates=tls is not None and tls.client_ca is not None,
            admins=admins,
        )

    def __init__(
        self,
        *,
        tokens: Mapping[str, str] | None = None,
        verify: Verifier | None = None,
        certificates: bool = False,
        admins: Iterable[str] = (),
    ) -> None:
        self._tokens = [(token.encode(), principal) for principal, token in (tokens or {}).items()]
        self._verify = verify
        self._certificates = certificates
        self.admins = frozenset(admins)
        self.on = bool(self._tokens) or verify is not None or certificates

    async def principal(self, context: grpc.aio.ServicerContext[Any, Any]) -> str:
        """The caller's principal; Fail (UNAUTHENTICATED / PERMISSION_DENIED) if none."""
        if not self.on:
            return ""
        metadata = {key: str(value) for key, value in context.invocation_metadata() or ()}
        scheme, _, credential = metadata.get("authorization", "").partition(" ")
        bearer = credential.strip() if scheme.lower() == "bearer" else None
        if bearer is not None and self._tokens:
            found = self._match(bearer)
            if found is not None:
                return found
            if self._verify is None:
                raise unauthenticated("the bearer token is not one this server accepts")
        auth = context.auth_context()
        certificate = certificate_principal(auth) if "x509_subject" in auth else None
        if self._verify is not None:
            peer = Peer(context.peer(), certificate, auth)
            try:
                verdict = self._verify(metadata, peer)
                if inspect.isawaitable(verdict):
                    verdict = await verdict
            except PermissionError as exc:
                raise denied(str(exc) or "refused by the server's verifier") from None
            if verdict:
                return str(verdict)
            raise unauthenticated("the server's verifier did not accept the caller's credentials")
        if certificate is not None and self._certificates:
            return certificate
        raise unauthenticated(
            "this server requires to know its callers: present a client certificate "
            "(--tls-cert/--tls-key) or a bearer token (--token)"
        )

    async def caller(self, context: grpc.aio.ServicerContext[Any, Any]) -> str:
        """``principal()`` for an RPC handler: a refused caller's RPC is aborted with the
        refusal's status; ``""`` when authentication is off."""
        if not self.on:
            return ""
        try:
            return await self.principal(context)
        except Fail as fail:
            await context.abort_with_status(fail.status())
            raise

    def _match(self, bearer: str) -> str | None:
        presented = bearer.encode()
        found = None
        for token, principal in self._tokens:  # every one, in constant time: no early exit
            if hmac.compare_digest(token, presented):
                found = principal
        return found


def unauthenticated(message: str) -> Fail:
    return Fail(Reason.UNAUTHENTICATED, message)


def denied(message: str) -> Fail:
    return Fail(Reason.PERMISSION_DENIED, message)
