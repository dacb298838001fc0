"""What an agent remembers of calls that carry a call id, so that a retry gets the first
outcome instead of a second run: bounded in count and in bytes, oldest forgotten first."""

from __future__ import annotations

import asyncio
import collections
from typing import Any, NamedTuple

from google.protobuf.struct_pb2 import Value

from sessionmesh.wire.codec import NotJsonLike, set_value

#: Outcomes remembered at most, agent-wide ...
MAX_CALLS = 10_000
#: ... and at most this many bytes of their results (encoded), agent-wide.
MAX_BYTES = 64 * 1024 * 1024
#: What a failure or a value that cannot be encoded is counted as.
_SMALL = 256


class Remembered(NamedTuple):
    #: The session id the call reported (the one it opened), or "".
    session_id: str
    outcome: asyncio.Future[Any]


class Recall:
    """Outcomes by (session id, call id); a call outside a session, or the one that opened
    a session, under session id ""."""

    def __init__(self, max_calls: int = MAX_CALLS, max_bytes: int = MAX_BYTES) -> None:
        self.max_calls = max_calls
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: collections.OrderedDict[tuple[str, str], tuple[Remembered, int]] = (
            collections.OrderedDict()
        )

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, session_id: str, call_id: str) -> Remembered | None:
        entry = self._entries.get((session_id, call_id))
        return entry[0] if entry is not None else None

    def put(self, session_id: str, call_id: str, remembered: Remembered) -> None:
        key = (session_id, call_id)
        self._entries[key] = (remembered, 0)
        remembered.outcome.add_done_callback(lambda done: self._sized(key, done))
        self._evict()

    def by_session(self) -> dict[str, list[tuple[str, Remembered]]]:
        """Every call id remembered, by the session it ran in (what a session takes along
        when it moves to another replica)."""
        index: dict[str, list[tuple[str, Remembered]]] = {}
        for (session_id, call_id), (remembered, _) in self._entries.items():
            if session_id:
                index.setdefault(session_id, []).append((call_id, remembered))
        return index

    def forget(self, session_id: str, call_id: str) -> None:
        entry = self._entries.pop((session_id, call_id), None)
        if entry is not None:
            self.bytes -= entry[1]

    def _sized(self, key: tuple[str, str], done: asyncio.Future[Any]) -> None:
        entry = self._entries.get(key)
        if entry is None or entry[0].outcome is not done:
            return  # forgotten already
        size = _size(done)
        self._entries[key] = (entry[0], size)
        self.bytes += size
        self._evict()

    def _evict(self) -> None:
        entries = self._entries
        while len(entries) > self.max_calls or (self.bytes > self.max_bytes and entries):
            _, (_, size) = entries.popitem(last=False)
            self.bytes -= size


def _size(done: asyncio.Future[Any]) -> int:
    """About what the outcome weighs. Scalars and strings are sized without encoding them
    (the adapter encodes the result anyway); only containers are encoded to be measured."""
    if done.cancelled() or done.exception() is not None:
        return _SMALL
    result = done.result()
    if result is None or isinstance(result, bool | int | float):
        return _SMALL
    if isinstance(result, str):
        return len(result) + _SMALL  # characters: within 4x of the UTF-8 bytes, usually 1x
    value = Value()
    try:
        set_value(value, result)
    except NotJsonLike:
        return _SMALL
    return value.ByteSize() + _SMALL
