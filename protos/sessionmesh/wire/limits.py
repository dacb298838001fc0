"""Channel and server settings both sides use."""

from __future__ import annotations

from typing import Any

DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
#: Streams (RPCs) at once on one client connection; more wait for a free one (HTTP/2).
DEFAULT_MAX_STREAMS_PER_CONNECTION = 256
#: Calls in flight on one Exchange stream; the agent refuses more (RESOURCE_EXHAUSTED,
#: TOO_MANY_CALLS), and the Python client sends its excess as unary Calls instead.
DEFAULT_MAX_CALLS_PER_STREAM = 1024

#: Every connection is pinged this often when nothing arrives on it ...
KEEPALIVE_TIME_MS = 5_000
#: ... and closed when a ping is not answered within this: a peer that is frozen, or gone
#: without a FIN, fails the calls waiting on it (UNAVAILABLE) within about 10 s.
KEEPALIVE_TIMEOUT_MS = 5_000


def grpc_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, Any]]:
    """Options for our channels and servers: the message size limit, both ways."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, Any]]:
    """Options for our channels: the size limit, and keepalive pings on every connection
    (also while idle, and while a long-lived stream carries no data)."""
    return [
        *grpc_options(max_message_bytes),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        # gRPC >= 1.5x times a ping out by this (60 s by default), not by keepalive_timeout.
        ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def server_options(
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_streams_per_connection: int = DEFAULT_MAX_STREAMS_PER_CONNECTION,
) -> list[tuple[str, Any]]:
    """Options for our servers: the size limit; keepalive pings to clients (a frozen or
    vanished client's streams end) and acceptance of our clients' pings (gRPC's default
    would answer them with GOAWAY 'too_many_pings'). SO_REUSEPORT (on by default in gRPC)
    is off: a second registry or agent on a port already taken must fail to bind, not
    silently split the traffic with the first."""
    return [
        *grpc_options(max_message_bytes),
        ("grpc.keepalive_time_ms", 2 * KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS - 1_000),
        ("grpc.so_reuseport", 0),
        ("grpc.max_concurrent_streams", max_streams_per_connection),
    ]
