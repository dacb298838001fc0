"""Where calls go: the seam between proxies and gRPC channels.

A proxy asks its Transport for an endpoint for a new session or a call without one
(``pick``), and for the endpoint that owns an existing session (``owner``). The one-address
transport here is the whole story for ``mesh.connect``; the mesh resolves through a registry.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any

import grpc

from sessionmesh.v1 import session_service_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from collections.abc import Sequence

    from sessionmesh.client._exchange import Exchange

DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # Each connect() gets its own connection rather than one shared by every channel to
        # the same address, so independent clients do not contend for one HTTP/2 connection.
        ("grpc.use_local_subchannel_pool", 1),
    ]


class Endpoint:
    """One agent instance behind one reused channel."""

    __slots__ = ("address", "channel", "exchange", "instance_id", "stub")

    def __init__(self, address: str, channel: grpc.aio.Channel, instance_id: str = "") -> None:
        self.address = address
        self.channel = channel
        self.instance_id = instance_id
        self.stub = pb_grpc.SessionServiceStub(channel)
        self.exchange: Exchange | None = None  # opened on first call (_exchange.py)

    def __repr__(self) -> str:
        return f"<Endpoint {self.address}>"


class Transport(abc.ABC):
    """Chooses endpoints for calls. Implementations own their channels."""

    #: Set once the client that owns the channels closed them; proxies then refuse calls.
    closed = False

    @abc.abstractmethod
    def pick(self) -> Endpoint:
        """An endpoint for a new session or a call without a session."""

    @abc.abstractmethod
    def owner(self, session_id: str) -> Endpoint:
        """The endpoint of the instance that owns ``session_id``."""

    def failed(self, endpoint: Endpoint) -> None:  # noqa: B027 - optional hook
        """A call could not reach ``endpoint``: try others first for a while."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Close the channels."""


class ChannelTransport(Transport):
    """Everything goes to one address over one channel."""

    def __init__(
        self,
        address: str,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        channel = grpc.aio.insecure_channel(
            address, options=[*channel_options(max_message_bytes), *options]
        )
        self.endpoint = Endpoint(address, channel)

    def pick(self) -> Endpoint:
        return self.endpoint

    def owner(self, session_id: str) -> Endpoint:
        return self.endpoint

    async def aclose(self) -> None:
        self.closed = True
        await close_endpoint(self.endpoint)


async def close_endpoint(endpoint: Endpoint) -> None:
    """Close the endpoint's exchange stream gracefully, then its channel."""
    if endpoint.exchange is not None:
        await endpoint.exchange.aclose()
    await endpoint.channel.close()
