"""Throwaway certificate authorities for the security tests (trustme, plus the one kind of
certificate trustme cannot issue: a URI SAN, as SPIFFE ids are)."""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sessionmesh import mesh


@dataclasses.dataclass
class Pki:
    """Files in ``root``: a CA, the server's certificate (127.0.0.1), clients' ones."""

    root: Path
    ca: trustme.CA = dataclasses.field(default_factory=trustme.CA)

    @property
    def ca_file(self) -> str:
        path = self.root / "ca.pem"
        if not path.exists():
            self.ca.cert_pem.write_to_path(str(path))
        return str(path)

    def issue(self, name: str, *identities: str, expired: bool = False) -> tuple[str, str]:
        """A certificate for ``identities`` (a DNS name, an IP, or a ``spiffe://`` URI) and
        its key: their file paths."""
        cert_file, key_file = self.root / f"{name}.pem", self.root / f"{name}.key"
        uris = [i for i in identities if "://" in i]
        if uris:
            cert, key = _with_uri(self.ca, uris[0])
            cert_file.write_bytes(cert)
            key_file.write_bytes(key)
        else:
            now = datetime.datetime.now(datetime.UTC)
            issued = self.ca.issue_cert(
                *identities,
                not_before=now - datetime.timedelta(days=2) if expired else None,
                not_after=now - datetime.timedelta(days=1) if expired else None,
            )
            issued.cert_chain_pems[0].write_to_path(str(cert_file))
            issued.private_key_pem.write_to_path(str(key_file))
        return str(cert_file), str(key_file)

    def server(self, *, client_ca: bool = True) -> mesh.TLS:
        """What a server on 127.0.0.1 serves (and dials peers with)."""
        cert, key = self.issue("server", "127.0.0.1", "localhost")
        return mesh.TLS(
            cert=cert, key=key, ca=self.ca_file, client_ca=self.ca_file if client_ca else None
        )

    def client(self, identity: str) -> mesh.TLS:
        cert, key = self.issue(identity.replace("/", "_").replace(":", "_"), identity)
        return mesh.TLS(cert=cert, key=key, ca=self.ca_file)


def _with_uri(ca: trustme.CA, uri: str) -> tuple[bytes, bytes]:
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem
