"""A real Redis server for the tests: a loopback port, data in a temporary directory, always
stopped. Redis comes from the distribution (`redis-server`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import redis.asyncio as aredis

from tests.procs import free_port, system_tool


def redis_binary() -> str:
    return system_tool("redis-server", "redis-server")


class Redis:
    def __init__(
        self, root: Path, *, append_only: bool, tls: tuple[str, str, str] | None = None
    ) -> None:
        self.root = root
        self.port = free_port()
        self.append_only = append_only
        #: (certificate, key, CA) files: serve TLS only, and require client certificates.
        self.tls = tls
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    def _listen(self) -> list[str]:
        if self.tls is None:
            return ["--port", str(self.port)]
        cert, key, ca = self.tls
        return [
            *["--port", "0", "--tls-port", str(self.port)],
            *["--tls-cert-file", cert, "--tls-key-file", key, "--tls-ca-cert-file", ca],
            *["--tls-auth-clients", "yes"],
        ]

    async def start(self, within: float = 10.0) -> None:
        log = os.open(self.root / "redis.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                redis_binary(),
                *self._listen(),
                *["--bind", "127.0.0.1", "--dir", str(self.root)],
                *["--save", ""],
                # With an append-only file synced on every write a killed server comes back
                # with everything it acknowledged (the store-down test restarts it).
                *(["--appendonly", "yes", "--appendfsync", "always"] if self.append_only else []),
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        finally:
            os.close(log)
        client = self.client(socket_connect_timeout=0.5)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        try:
            while True:
                try:
                    if await client.ping():
                        return
                except (OSError, aredis.ConnectionError):
                    pass
                if loop.time() > deadline:
                    raise AssertionError(f"redis-server did not answer within {within} s")
                await asyncio.sleep(0.02)
        finally:
            await client.aclose()

    async def kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGKILL)
            await proc.wait()

    async def ttls(self) -> dict[bytes, int]:
        """Every key the server holds, with its time to live in milliseconds."""
        client = self.client()
        try:
            keys: list[bytes] = await client.keys("*")  # type: ignore[assignment]  # no decoding
            return {key: int(await client.pttl(key)) for key in keys}
        finally:
            await client.aclose()

    async def keys(self) -> int:
        """How many keys the server holds."""
        client = self.client()
        try:
            return int(await client.dbsize())
        finally:
            await client.aclose()

    def client(self, **options: Any) -> aredis.Redis:
        if self.tls is not None:
            cert, key, ca = self.tls
            options.update(ssl=True, ssl_certfile=cert, ssl_keyfile=key, ssl_ca_certs=ca)
        return aredis.Redis(host="127.0.0.1", port=self.port, **options)


@contextlib.asynccontextmanager
async def redis_server(
    *, append_only: bool = False, tls: tuple[str, str, str] | None = None
) -> AsyncIterator[Redis]:
    with tempfile.TemporaryDirectory(prefix="sessionmesh-redis-") as root:
        server = Redis(Path(root), append_only=append_only, tls=tls)
        try:
            await server.start()
            yield server
        finally:
            await server.kill()
