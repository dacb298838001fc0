"""Metadata keys of the SessionService contract (docs/wire-protocol.md)."""

from __future__ import annotations

from typing import Final

#: Request header: the session a Call or StreamCall runs in.
SESSION_ID_KEY: Final = "x-session-id"
#: Request header ``1`` (or ``true``): open a session with this call; its id comes back in
#: the response headers under SESSION_ID_KEY, before the tool runs.
SESSION_CREATE_KEY: Final = "x-session-create"
#: StreamCall response header: the window the agent grants (the asked one, capped by the
#: tool's buffer_size); the client grants credit against it.
STREAM_WINDOW_KEY: Final = "x-stream-window"
#: Exchange request header ``1``: this client takes several answers in one message
#: (``ExchangeResponse.more``); the agent's response header ``1``: it takes several calls
#: in one message (``ExchangeRequest.more``). Either side batches only once told.
EXCHANGE_BATCH_KEY: Final = "x-exchange-batch"
#: Trailer carrying a serialized ``google.rpc.Status`` with the ErrorInfo (gRPC's own key).
STATUS_DETAILS_KEY: Final = "grpc-status-details-bin"
