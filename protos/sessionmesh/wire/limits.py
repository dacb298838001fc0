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
