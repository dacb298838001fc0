"""A handshake-era ``Mcp-Session-Id`` with no table behind it (MCP 2025-11-25).

The front door runs stateless, yet handshake-era clients expect the ``initialize`` answer
to name a session and send it back. The id is a random nonce and its HMAC under a key the
front doors share (``--session-key``): any front door with the key accepts it, none keeps
anything, and a forged or foreign one is answered 404, as for a session that ended (the
client starts anew). ``DELETE`` of a valid id succeeds: there is nothing to delete. A
``notifications/cancelled`` cancels the call it names if that call runs on this process.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

HEADER = b"mcp-session-id"
#: An initialize request is small: bodies over this are never looked into.
_MAX_LOOK = 64 * 1024


class SignedSessions:
    def __init__(self, app: ASGIApp, key: bytes) -> None:
        self.app = app
        self.key = key
        #: Calls in flight, by (session id, request id): a handshake-era client cancels one
        #: with a notification that arrives as a request of its own, at a stateless
        #: transport that never saw the call. Only calls on this process are found.
        self.in_flight: dict[tuple[str, str], asyncio.Task[Any]] = {}
        #: The open GET streams of handshake-era clients: each is told when tools change.
        self.listening: set[asyncio.Queue[bytes]] = set()

    def tools_changed(self) -> None:
        """Tell every listening client (``notifications/tools/list_changed``)."""
        event = _sse({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"})
        for queue in self.listening:
            queue.put_nowait(event)

    def new(self) -> str:
        nonce = secrets.token_urlsafe(16)
        return f"{nonce}.{self._mac(nonce)}"

    def valid(self, session_id: str) -> bool:
        nonce, _, mac = session_id.partition(".")
        return bool(nonce) and hmac.compare_digest(mac, self._mac(nonce))

    def _mac(self, nonce: str) -> str:
        return hmac.new(self.key, nonce.encode(), hashlib.sha256).hexdigest()[:32]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        presented = headers.get(HEADER)
        if presented is not None:
            if not self.valid(presented.decode("latin-1")):
                await _respond(send, 404, "no such session: initialize again")
                return
            if scope["method"] == "DELETE":
                await _respond(send, 200, None)  # nothing is kept: nothing to end
                return
            if scope["method"] == "GET":
                await self._listen(receive, send)
                return
        length = int(headers.get(b"content-length", b"0") or 0)
        if scope["method"] != "POST" or not 0 < length <= _MAX_LOOK:
            await self.app(scope, receive, send)
            return
        # Read the body to see whether it is an initialize, then hand it on as it came.
        received: list[Message] = []
        body = b""
        while True:
            message = await receive()
            received.append(message)
            body += message.get("body", b"")
            if message["type"] != "http.request" or not message.get("more_body"):
                break

        async def replay() -> Message:
            return received.pop(0) if received else await receive()

        # Most bodies are tools/call: only the two methods looked for are parsed here.
        wanted = b'"initialize"' in body or b"notifications/cancelled" in body
        request = _json(body) if wanted else {}
        if presented is not None and request.get("method") == "notifications/cancelled":
            params = request.get("params") or {}
            call = self.in_flight.get((presented.decode("latin-1"), str(params.get("requestId"))))
            if call is not None:
                call.cancel()
        if request.get("method") != "initialize":
            await self.app(scope, replay, send)
            return
        session_id = self.new().encode()

        async def named(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 200:
                message["headers"] = [*message.get("headers", ()), (HEADER, session_id)]
            await send(message)

        await self.app(scope, replay, named)

    async def _listen(self, receive: Receive, send: Send) -> None:
        """A handshake-era client's standing stream: server notifications (tools changed)
        until the client goes away. Held by this connection only, not by a session."""
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.listening.add(queue)
        headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-store")]
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send(
                {"type": "http.response.body", "body": b": listening\n\n", "more_body": True}
            )
            gone = asyncio.ensure_future(_disconnected(receive))
            try:
                while not gone.done():
                    event = asyncio.ensure_future(queue.get())
                    await asyncio.wait([event, gone], return_when=asyncio.FIRST_COMPLETED)
                    if not event.done():
                        event.cancel()
                        break
                    await send(
                        {"type": "http.response.body", "body": event.result(), "more_body": True}
                    )
            finally:
                gone.cancel()
            await send({"type": "http.response.body", "body": b""})
        except OSError:
            pass  # the client went away mid-write
        finally:
            self.listening.discard(queue)


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _sse(message: dict[str, Any]) -> bytes:
    return f"event: message\ndata: {json.dumps(message)}\n\n".encode()


def _json(body: bytes) -> dict[str, Any]:
    try:
        request = json.loads(body)
    except ValueError:
        return {}
    return request if isinstance(request, dict) else {}


async def _respond(send: Send, status: int, message: str | None) -> None:
    body = (
        json.dumps({"jsonrpc": "2.0", "id": None, "error": {"code": -32001, "message": message}})
        if message
        else ""
    ).encode()
    headers = [(b"content-type", b"application/json")] if body else []
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
