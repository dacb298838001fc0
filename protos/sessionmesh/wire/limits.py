"""Channel and server settings both sides use."""

from __future__ import annotations

from typing import Any

DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024


def grpc_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, Any]]:
    """Options for our channels and servers: the message size limit, both ways."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


def server_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, Any]]:
    """Options for our servers. SO_REUSEPORT (on by default in gRPC) is off: a second
    registry or agent on a port already taken must fail to bind, not silently split the
    traffic with the first."""
    return [*grpc_options(max_message_bytes), ("grpc.so_reuseport", 0)]
