"""Where durable sessions are kept: the seam (:class:`SessionRecords`) and its engine, Redis.

A record is one session: its owner and epoch (the fence), its principal and idle TTL, its
state as JSON, and the outcomes of its most recent calls (for exactly-once retries across a
takeover). Every change is one atomic step in the store (a Lua script in Redis), so an owner
can never overwrite the record of a session another instance has since taken over.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import hashlib
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import urlsplit

from sessionmesh.core import TLS
from sessionmesh.errors import UsageError
from sessionmesh.server._security import is_loopback

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable


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
    #: The kept outcomes by call id, as saved (``_durable`` orders them).
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

    async def ping(self) -> None:  # noqa: B027 - optional hook
        """Raise StoreUnavailable if the store does not answer now."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


def check_url(url: str, *, insecure: bool = False) -> None:
    """Refuse a ``--session-store`` URL no engine here can open (at once, not at start), and
    a plaintext one to another host unless ``insecure``: sessions' state would cross the
    network in the clear."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise UsageError(
            f"session store {url!r}: give redis://HOST:PORT/DB (or rediss:// for TLS, "
            "unix:///path.sock); no other engine is built in"
        )
    if parts.scheme == "redis" and not is_loopback(parts.hostname or "") and not insecure:
        raise UsageError(
            f"session store redis://{parts.hostname}... is plaintext to another host: use "
            "rediss:// (TLS), or --insecure (insecure=True) on a network you trust"
        )
    try:
        import redis.asyncio  # noqa: F401
    except ImportError:
        raise UsageError(
            "a redis:// session store needs the redis client: pip install 'sessionmesh[redis]'"
        ) from None


def open_records(url: str, agent_name: str, tls: TLS | None = None) -> SessionRecords:
    """The store behind a ``--session-store`` URL (checked already); ``tls`` is the agent's
    own, used for ``rediss://``."""
    return RedisRecords(url, agent_name, tls)


# Fields of a record: owner, epoch, principal, ttl, state, and c:<call id> for each kept outcome.
_SAVE = """
local cur = redis.call('HMGET', KEYS[1], 'owner', 'epoch')
if not cur[1] then
  if ARGV[3] ~= '1' then return {'gone'} end
  redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'epoch', ARGV[2], 'principal', ARGV[5],
             'ttl', ARGV[10], 'state', '{}')
elseif cur[1] ~= ARGV[1] or cur[2] ~= ARGV[2] then
  return {'fenced', cur[1]}
end
if ARGV[6] ~= '' then redis.call('HSET', KEYS[1], 'state', ARGV[6]) end
if ARGV[7] ~= '' then redis.call('HSET', KEYS[1], ARGV[7], ARGV[8]) end
if ARGV[9] ~= '' then redis.call('HDEL', KEYS[1], ARGV[9]) end
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


#: Connections to the store at most (calls beyond wait for one).
MAX_CONNECTIONS = 16


class RedisRecords(SessionRecords):
    """Records in Redis (the ``redis`` package), one hash per session. Keys hold a hash of
    the session id, never the id: the store's key space does not hold secrets.

    Commands go straight over redis-py's asyncio connections, kept here, one per command in
    flight, under one deadline each: the client-level API costs ~50 µs more a command (pool
    lock, retry wrapper, a task per write for its socket timeout), a third of what a
    durable call may add in all. redis-py reads and parses every reply."""

    def __init__(self, url: str, agent_name: str, tls: TLS | None = None) -> None:
        import redis.asyncio as aredis
        import redis.exceptions

        self.url = url
        self._prefix = f"sessionmesh:{agent_name}:session:"
        options: dict[str, Any] = {}
        if tls is not None and urlsplit(url).scheme == "rediss":
            # The agent's one TLS description: its CA verifies Redis, its certificate is
            # presented to a Redis that wants client certificates (URL options win).
            options = {"ssl_ca_certs": tls.ca, "ssl_certfile": tls.cert, "ssl_keyfile": tls.key}
            options = {k: v for k, v in options.items() if v is not None}
        # No socket timeout (it costs a task per write): _run bounds each command instead.
        self._pool: Any = aredis.ConnectionPool.from_url(
            url, socket_timeout=None, socket_connect_timeout=STORE_TIMEOUT, **options
        )
        self._idle: list[Any] = []  # connected, free for the next command
        # A burst of calls shares a few connections rather than opening one each: each is
        # a socket on the store, and buffers here that outlive the burst.
        self._slots = asyncio.Semaphore(MAX_CONNECTIONS)
        self._errors: tuple[type[BaseException], ...] = (
            redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError,
            OSError,
        )
        self._no_script = redis.exceptions.NoScriptError
        self._save = _Script(_SAVE)
        self._adopt = _Script(_ADOPT)
        self._delete = _Script(_DELETE)
        self._delete_any = _Script(_DELETE_ANY)

    def key(self, session_id: str) -> str:
        return self._prefix + hashlib.sha256(session_id.encode()).hexdigest()[:32]

    async def _run(self, script: _Script, session_id: str, *args: Any) -> Any:
        """Run ``script`` on the session's key."""
        return await self._talk(self._eval, script, self.key(session_id), args)

    async def _eval(self, conn: Any, script: _Script, key: str, args: tuple[Any, ...]) -> Any:
        try:
            await conn.send_packed_command(_pack(b"EVALSHA", script.sha, 1, key, args), False)
            return await conn.read_response()
        except self._no_script:  # a fresh server learns the script
            await conn.send_packed_command(_pack(b"EVAL", script.source, 1, key, args))
            return await conn.read_response()

    async def ping(self) -> None:
        await self._talk(_ping)

    async def _talk(self, talk: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """``talk(connection, *args)`` on a free connection: a store that does not answer
        (down, unreachable, too slow) is StoreUnavailable."""
        async with self._slots:
            return await self._talk_on(talk, args)

    async def _talk_on(self, talk: Callable[..., Awaitable[Any]], args: tuple[Any, ...]) -> Any:
        conn = self._idle.pop() if self._idle else self._pool.make_connection()
        try:
            async with asyncio.timeout(STORE_TIMEOUT):
                reply = await talk(conn, *args)
        except TimeoutError:
            await conn.disconnect()
            raise StoreUnavailable(
                f"session store {self.url}: no answer within {STORE_TIMEOUT:g} s"
            ) from None
        except self._errors as exc:
            await conn.disconnect()
            raise StoreUnavailable(f"session store {self.url}: {exc}") from None
        except BaseException:
            await conn.disconnect()  # cut off mid-command: its reply would be read as the next's
            raise
        self._idle.append(conn)
        return reply

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
        outcomes = {k[2:].decode(): v for k, v in fields.items() if k.startswith(b"c:")}
        return Record(
            epoch=int(fields[b"epoch"]),
            ttl=float(fields[b"ttl"]),
            state=fields[b"state"].decode(),
            outcomes=outcomes,
        )

    async def delete(self, session_id: str, owner: str, epoch: int) -> Saved:
        return Saved((await self._run(self._delete, session_id, owner, epoch)).decode())

    async def delete_any(self, session_id: str, principal: str) -> bool:
        return bool(await self._run(self._delete_any, session_id, principal))

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.disconnect()
        await self._pool.disconnect()


async def _ping(conn: Any) -> Any:
    await conn.send_packed_command(b"*1\r\n$4\r\nPING\r\n", False)
    return await conn.read_response()


def _pack(command: bytes, script: str, keys: int, key: str, args: tuple[Any, ...]) -> bytes:
    """One command in Redis's wire format (RESP arrays of bulk strings): cheaper than
    redis-py's general packer on this path, where every call pays for it."""
    items = [command, script.encode(), b"%d" % keys, key.encode()]
    items += [a if isinstance(a, bytes) else str(a).encode() for a in args]
    out = [b"*%d\r\n" % len(items)]
    for item in items:
        out.append(b"$%d\r\n%s\r\n" % (len(item), item))
    return b"".join(out)


class _Script:
    """A Lua script, run by its SHA1 (EVALSHA) once the server has it."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()
