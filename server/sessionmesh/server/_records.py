"""Where durable sessions are kept: the seam (:class:`SessionRecords`) and its engine, Redis.

A record is one session: its owner and epoch (the fence), its principal and idle TTL, its
state as JSON, and the outcomes of its most recent calls (for exactly-once retries across a
takeover). Every change is one atomic step in the store (a Lua script in Redis), so an owner
can never overwrite the record of a session another instance has since taken over.
"""

from __future__ import annotations

import abc
import enum
import hashlib
import json
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import urlsplit

from sessionmesh.client.errors import UsageError

if TYPE_CHECKING:
    from collections.abc import Sequence


class StoreUnavailable(Exception):
    """The session store did not answer (down, unreachable, timed out)."""


class Saved(enum.Enum):
    OK = "ok"
    #: Another instance owns the session now (a higher epoch): this copy is stale.
    FENCED = "fenced"
    #: No record: the session was closed, or expired, everywhere.
    GONE = "gone"


class SaveResult(NamedTuple):
    saved: Saved
    #: For FENCED: the instance that owns the session now.
    owner: str = ""


class Record(NamedTuple):
    """A session as adoption loads it."""

    epoch: int
    ttl: float
    state: str  # JSON text
    calls: list[str]  # the call ids whose outcomes are kept, oldest first
    outcomes: dict[str, bytes]


class Save(NamedTuple):
    """One write-through: the fence to check, and what changed."""

    owner: str
    epoch: int
    #: The first save of a session this instance opened: the record may not exist yet.
    new: bool
    principal: str
    ttl: float
    #: The state as JSON, or None when it did not change since the last save.
    state: str | None
    #: The call ids kept, oldest first, written when ``outcome`` is.
    calls: Sequence[str] = ()
    #: (call id, encoded outcome) of the call just run, if it carried an id.
    outcome: tuple[str, bytes] | None = None
    #: A call id whose outcome is no longer kept.
    forget: str | None = None


class SessionRecords(abc.ABC):
    """The seam every session-store engine implements; all methods are atomic."""

    url: str = ""

    @abc.abstractmethod
    async def save(self, session_id: str, save: Save) -> SaveResult: ...

    @abc.abstractmethod
    async def adopt(self, session_id: str, owner: str, principal: str) -> Record | None:
        """Take the session over: bump its epoch, make ``owner`` its owner and return it;
        None when there is no such session for ``principal``."""

    @abc.abstractmethod
    async def delete(self, session_id: str, owner: str, epoch: int) -> Saved:
        """Remove the record if this owner still holds it (OK), or say it is GONE already
        or FENCED (another owner has it: leave it)."""

    @abc.abstractmethod
    async def delete_any(self, session_id: str, principal: str) -> bool:
        """Remove the record of ``principal``'s session whoever owns it (CloseSession on an
        instance without a copy); whether there was one."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


def check_url(url: str) -> None:
    """Refuse a ``--session-store`` URL no engine here can open (at once, not at start)."""
    if urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        raise UsageError(
            f"session store {url!r}: give redis://HOST:PORT/DB (or rediss:// for TLS, "
            "unix:///path.sock); no other engine is built in"
        )
    try:
        import redis.asyncio  # noqa: F401
    except ImportError:
        raise UsageError(
            "a redis:// session store needs the redis client: pip install 'sessionmesh[redis]'"
        ) from None


def open_records(url: str, agent_name: str) -> SessionRecords:
    """The store behind a ``--session-store`` URL."""
    check_url(url)
    return RedisRecords(url, agent_name)


# Fields of a record: owner, epoch, principal, ttl, state, calls (JSON list), c:<call id>.
_SAVE = """
local cur = redis.call('HMGET', KEYS[1], 'owner', 'epoch')
if not cur[1] then
  if ARGV[3] ~= '1' then return {'gone'} end
  redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'epoch', ARGV[2], 'principal', ARGV[5],
             'ttl', ARGV[11], 'state', '{}', 'calls', '[]')
elseif cur[1] ~= ARGV[1] or cur[2] ~= ARGV[2] then
  return {'fenced', cur[1]}
end
if ARGV[6] ~= '' then redis.call('HSET', KEYS[1], 'state', ARGV[6]) end
if ARGV[8] ~= '' then redis.call('HSET', KEYS[1], ARGV[8], ARGV[9], 'calls', ARGV[7]) end
if ARGV[10] ~= '' then redis.call('HDEL', KEYS[1], ARGV[10]) end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {'ok'}
"""

_ADOPT = """
local cur = redis.call('HMGET', KEYS[1], 'principal', 'ttl')
if not cur[2] or cur[1] ~= ARGV[2] then return false end
redis.call('HINCRBY', KEYS[1], 'epoch', 1)
redis.call('HSET', KEYS[1], 'owner', ARGV[1])
redis.call('PEXPIRE', KEYS[1], math.floor(tonumber(cur[2]) * 1000))
return redis.call('HGETALL', KEYS[1])
"""

_DELETE = """
local cur = redis.call('HMGET', KEYS[1], 'owner', 'epoch')
if not cur[1] then return 'gone' end
if cur[1] ~= ARGV[1] or cur[2] ~= ARGV[2] then return 'fenced' end
redis.call('DEL', KEYS[1])
return 'ok'
"""

_DELETE_ANY = """
if redis.call('HGET', KEYS[1], 'principal') ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
"""

#: How long one store command may take before the call fails as "store unavailable".
STORE_TIMEOUT = 2.0


class RedisRecords(SessionRecords):
    """Records in Redis (``redis`` package, asyncio API), one hash per session. Keys hold a
    hash of the session id, never the id: the store's key space does not hold secrets."""

    def __init__(self, url: str, agent_name: str) -> None:
        import redis.asyncio as aredis
        import redis.exceptions
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.url = url
        self._prefix = f"sessionmesh:{agent_name}:session:"
        # One quick retry of a dropped connection; a store that is down fails the call (the
        # caller retries), it does not hold it.
        self._client: Any = aredis.Redis.from_url(
            url,
            socket_timeout=STORE_TIMEOUT,
            socket_connect_timeout=STORE_TIMEOUT,
            retry=Retry(NoBackoff(), 1),
        )
        self._errors: tuple[type[BaseException], ...] = (
            redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError,
            OSError,
        )
        self._save = self._client.register_script(_SAVE)
        self._adopt = self._client.register_script(_ADOPT)
        self._delete = self._client.register_script(_DELETE)
        self._delete_any = self._client.register_script(_DELETE_ANY)

    def key(self, session_id: str) -> str:
        return self._prefix + hashlib.sha256(session_id.encode()).hexdigest()[:32]

    async def _run(self, script: Any, session_id: str, *args: Any) -> Any:
        try:
            return await script(keys=[self.key(session_id)], args=args)
        except self._errors as exc:
            raise StoreUnavailable(f"session store {self.url}: {exc}") from None

    async def save(self, session_id: str, save: Save) -> SaveResult:
        call_id, outcome = save.outcome or ("", b"")
        result = await self._run(
            self._save,
            session_id,
            save.owner,
            save.epoch,
            "1" if save.new else "0",
            max(1, int(save.ttl * 1000)),
            save.principal,
            save.state or "",
            _calls_json(save.calls) if save.outcome else "",
            "c:" + call_id if save.outcome else "",
            outcome,
            "c:" + save.forget if save.forget else "",
            repr(save.ttl),
        )
        kind = result[0].decode()
        if kind == "ok":
            return SaveResult(Saved.OK)
        if kind == "fenced":
            return SaveResult(Saved.FENCED, result[1].decode())
        return SaveResult(Saved.GONE)

    async def adopt(self, session_id: str, owner: str, principal: str) -> Record | None:
        flat = await self._run(self._adopt, session_id, owner, principal)
        if not flat:
            return None
        fields = dict(zip(flat[::2], flat[1::2], strict=True))
        calls: list[str] = json.loads(fields[b"calls"])
        outcomes = {c: fields[b"c:" + c.encode()] for c in calls if b"c:" + c.encode() in fields}
        return Record(
            epoch=int(fields[b"epoch"]),
            ttl=float(fields[b"ttl"]),
            state=fields[b"state"].decode(),
            calls=[c for c in calls if c in outcomes],
            outcomes=outcomes,
        )

    async def delete(self, session_id: str, owner: str, epoch: int) -> Saved:
        return Saved((await self._run(self._delete, session_id, owner, epoch)).decode())

    async def delete_any(self, session_id: str, principal: str) -> bool:
        return bool(await self._run(self._delete_any, session_id, principal))

    async def aclose(self) -> None:
        await self._client.aclose()


def _calls_json(calls: Sequence[str]) -> str:
    return json.dumps(list(calls), separators=(",", ":"))
