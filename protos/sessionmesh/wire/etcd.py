"""The mesh on etcd, as agents and clients both read it: where the keys are and what they hold.

Each instance is one key, ``<prefix>/instances/<instance id>``, whose value is the serialized
``sessionmesh.v1.Instance``, attached to a lease its agent keeps alive: the key goes with
the lease when the agent dies. Any language's etcd client can read the mesh this way.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Any

SCHEMES = ("etcd", "etcds")
DEFAULT_PREFIX = "/sessionmesh"


class EtcdAddressError(ValueError):
    """An etcd:// address that cannot be used (the message says why)."""


def api() -> Any:
    """The etcd v3 API's generated stubs, as ``aetcd`` ships them (``sessionmesh[etcd]``)."""
    try:
        from aetcd import rpc
    except ImportError:
        raise EtcdAddressError(
            "an etcd:// registry needs the etcd client: pip install 'sessionmesh[etcd]'"
        ) from None
    return rpc


@dataclasses.dataclass(frozen=True)
class EtcdTarget:
    """``etcd://HOST:PORT[,HOST:PORT...][/PREFIX]``; ``etcds://`` dials the cluster over TLS
    with the process's own TLS settings."""

    url: str
    endpoints: tuple[str, ...]
    prefix: str
    secure: bool

    @property
    def instances(self) -> bytes:
        return f"{self.prefix}/instances/".encode()

    def key(self, instance_id: str) -> bytes:
        return self.instances + instance_id.encode()

    def grpc_target(self) -> str:
        """One gRPC target for every member: gRPC fails over between them (pick_first)."""
        if len(self.endpoints) == 1:
            return self.endpoints[0]
        hosts = [e.rpartition(":")[0].strip("[]") for e in self.endpoints]
        try:
            families = {ipaddress.ip_address(h).version for h in hosts}
        except ValueError:
            raise EtcdAddressError(
                f"{self.url}: give several etcd members as IP addresses (or one DNS name that "
                "resolves to them all)"
            ) from None
        if len(families) != 1:
            raise EtcdAddressError(f"{self.url}: a mix of IPv4 and IPv6 members")
        return f"ipv{families.pop()}:" + ",".join(self.endpoints)


def parse(url: str) -> EtcdTarget | None:
    """The etcd cluster a registry address names, or None if it is not an etcd:// URL."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in SCHEMES:
        return None
    members, _, prefix = rest.partition("/")
    endpoints = tuple(m for m in members.split(",") if m)
    if not endpoints or any(":" not in m for m in endpoints):
        raise EtcdAddressError(
            f"{url!r}: give etcd members as HOST:PORT, e.g. etcd://10.0.0.5:2379"
        )
    prefix = "/" + prefix.strip("/") if prefix.strip("/") else DEFAULT_PREFIX
    return EtcdTarget(url, endpoints, prefix, scheme == "etcds")


def channel_options() -> list[tuple[str, Any]]:
    """Our channel options, and a reconnect backoff capped at a second: gRPC's own grows to
    two minutes, and a mesh whose etcd came back must not wait that long to see it."""
    from sessionmesh.wire.limits import channel_options as ours

    return [
        *ours(),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]


def prefix_end(prefix: bytes) -> bytes:
    """The range end that covers every key starting with ``prefix``."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


def instance_key_id(target: EtcdTarget, key: bytes) -> str:
    return key[len(target.instances) :].decode()
