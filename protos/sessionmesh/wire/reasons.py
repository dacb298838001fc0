"""``google.rpc.ErrorInfo`` reasons (domain ``sessionmesh``) an agent answers with."""

from __future__ import annotations

from typing import Final

ERROR_DOMAIN: Final = "sessionmesh"


class Reason:
    """`google.rpc.ErrorInfo.reason` values sent by agents (docs/wire-protocol.md)."""

    SESSION_NOT_FOUND: Final = "SESSION_NOT_FOUND"
    SESSION_REQUIRED: Final = "SESSION_REQUIRED"
    TOOL_NOT_FOUND: Final = "TOOL_NOT_FOUND"
    INVALID_ARGUMENTS: Final = "INVALID_ARGUMENTS"
    TOOL_FAILED: Final = "TOOL_FAILED"
    TOO_MANY_SESSIONS: Final = "TOO_MANY_SESSIONS"
    TOOL_TIMEOUT: Final = "TOOL_TIMEOUT"
    INVALID_STREAM: Final = "INVALID_STREAM"
    SHUTTING_DOWN: Final = "SHUTTING_DOWN"
    SESSION_ELSEWHERE: Final = "SESSION_ELSEWHERE"
    #: An Exchange stream already carries the agent's limit of calls in flight.
    TOO_MANY_CALLS: Final = "TOO_MANY_CALLS"
    #: No credentials, or ones the server does not accept (UNAUTHENTICATED).
    UNAUTHENTICATED: Final = "UNAUTHENTICATED"
    #: A known caller that may not do this (PERMISSION_DENIED): a tool's allow-list, the
    #: registry's names, the verifier's refusal.
    PERMISSION_DENIED: Final = "PERMISSION_DENIED"
    #: Registry -> agent, ending its Register stream: it stayed unreachable past the
    #: lost-after bound and was removed; callers were told its sessions are lost.
    INSTANCE_LOST: Final = "INSTANCE_LOST"
    #: A durable session's store did not answer: nothing was saved, the call can be retried.
    SESSION_STORE_UNAVAILABLE: Final = "SESSION_STORE_UNAVAILABLE"
    #: A durable session's state has a value with no JSON form; the call is refused and the
    #: session keeps its last saved state.
    STATE_NOT_JSON: Final = "STATE_NOT_JSON"
