"""How `sessionmesh run` keeps its agent processes: starts them, passes on what they
print (each line with its agent), restarts one that dies or whose file changed, and stops
them all in order; and the signals that ask `serve` and `run` to stop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio

from sessionmesh.core._tasks import Tasks, race
from sessionmesh.core.cli import say
from sessionmesh.server import _logs as logs

log = logging.getLogger("sessionmesh.run")


class Signals:
    """SIGINT and SIGTERM: the first asks for a graceful stop, a second one to hurry. The
    handlers stay installed, so a second Ctrl-C never tears the event loop down mid-way."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.hurry = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.received)

    def received(self) -> None:
        if self.stop.is_set():
            self.hurry.set()
        self.stop.set()


async def unless(hurry: asyncio.Event, work: Awaitable[None]) -> bool:
    """Run ``work`` unless (or until) ``hurry`` is set; True if it ran to the end. What the
    work raised is raised."""

    async def run() -> None:
        await work

    await race(run, hurry.wait)
    return not hurry.is_set()


# -- serve ------------------------------------------------------------------------------------


async def spawn(
    file: str, registry: str, extra: Sequence[str], env: dict[str, str], output: Output
) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "sessionmesh.server._cli", "serve", file],
        *["--registry", registry, "--stop-with-parent", *extra],
        env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        # Its own session: a Ctrl-C in the terminal reaches `run` alone, which then stops
        # the agents in order (a second Ctrl-C: at once).
        start_new_session=True,
    )
    output.follow(proc, Path(file).stem)
    return proc


#: ANSI colours for the agents' prefixes on a terminal.
_COLOURS = ("36", "33", "35", "32", "34", "31")


class Output:
    """Every line the agent processes write, passed on with who wrote it: ``[counter
    1a2b3c4d] ...`` (coloured on a terminal). Their stderr goes to ours; their stdout (a
    tool's print()) to ours, after the ready line `run` reads itself."""

    def __init__(self) -> None:
        self.labels: dict[asyncio.subprocess.Process, str] = {}
        self.pumps = Tasks("run's output", log)
        self._colours: dict[str, str] = {}

    def follow(self, proc: asyncio.subprocess.Process, name: str) -> None:
        self.labels[proc] = name
        assert proc.stderr is not None
        self._pump(proc, proc.stderr, sys.stderr)

    def ready(self, proc: asyncio.subprocess.Process, ready: dict[str, Any]) -> None:
        self.labels[proc] = f"{ready['agent']} {ready['instance']}"
        assert proc.stdout is not None
        self._pump(proc, proc.stdout, sys.stdout)

    def _pump(
        self, proc: asyncio.subprocess.Process, stream: asyncio.StreamReader, out: Any
    ) -> None:
        self.pumps.start(self._lines(proc, stream, out))

    async def _lines(
        self, proc: asyncio.subprocess.Process, stream: asyncio.StreamReader, out: Any
    ) -> None:
        as_json = os.environ.get(logs.LOG_FORMAT_ENV) == "json"
        while line := await stream.readline():
            label = self.labels[proc]
            text = line.decode(errors="replace")
            if as_json:  # one JSON object a line, whoever wrote it: the agent's a field
                agent, _, instance = label.partition(" ")
                fields = {"agent": agent, **({"instance": instance} if instance else {})}
                text = logs.as_json_line(text.rstrip("\n"), **fields) + "\n"
            else:
                prefix = f"[{label}]"
                if out.isatty():
                    colour = self._colours.setdefault(
                        label.split()[0], _COLOURS[len(self._colours) % len(_COLOURS)]
                    )
                    prefix = f"\033[{colour}m{prefix}\033[0m"
                text = f"{prefix} {text}"
            with contextlib.suppress(BrokenPipeError):
                out.write(text)
                out.flush()

    async def aclose(self) -> None:
        """Pass on what the exited agents still had to say, then stop."""
        with anyio.move_on_after(2):
            await self.pumps.wait()
        await self.pumps.aclose()


def each(files: Sequence[str], replicas: int) -> list[str]:
    return [file for file in files for _ in range(replicas)]


async def ready_line(proc: asyncio.subprocess.Process) -> dict[str, Any]:
    assert proc.stdout is not None
    line = await proc.stdout.readline()
    if not line:
        raise SystemExit(f"sessionmesh: an agent failed to start (exit {await proc.wait()})")
    ready: dict[str, Any] = json.loads(line)
    return ready


#: A replica that ran this long before it died is restarted at once, not after a backoff.
HEALTHY_AFTER = 30.0
MAX_BACKOFF = 30.0


class Supervisor:
    """Watches `run`'s agent processes: restarts one that dies (``--restart``, with a
    backoff that doubles while it keeps dying young), and with ``--watch`` restarts the
    replicas of a file that changed."""

    def __init__(
        self,
        files: dict[asyncio.subprocess.Process, str],
        procs: list[asyncio.subprocess.Process],
        spawn: Callable[[str], Awaitable[asyncio.subprocess.Process]],
        output: Output,
        *,
        policy: str,
        watch: bool,
    ) -> None:
        self.output = output
        self.files = files
        self.procs = procs  # shared with the caller, which stops them all at the end
        self.spawn = spawn
        self.policy = policy  # --restart: on-failure, always, never
        self.watch = watch
        loop = asyncio.get_running_loop()
        self.started = dict.fromkeys(files, loop.time())
        self.backoff: dict[str, float] = {}
        self.replacing: set[asyncio.subprocess.Process] = set()  # stopped by us, on purpose
        #: --watch: files whose agent failed (say, a syntax error): started again at the
        #: file's next save, not retried with a backoff meanwhile.
        self.broken: set[str] = set()

    async def run(self, signals: Signals) -> None:
        # What the loop waits on, each in a task this method owns and ends on its way out.
        waits = Tasks("run's supervisor", log)
        exits: dict[asyncio.Future[Any], asyncio.subprocess.Process] = {
            waits.start(p.wait()): p for p in self.files
        }
        stopping = waits.start(signals.stop.wait())
        changes = waits.start(self._changed()) if self.watch else None
        try:
            while (exits or changes) and not signals.stop.is_set():
                waiting = [stopping, *exits, *([changes] if changes else [])]
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if changes is not None and changes in done:
                    changed = changes.result()
                    for proc in [p for p, f in self.files.items() if f in changed]:
                        say(f"{self.files[proc]} changed: restarting its agent")
                        self.replacing.add(proc)
                        proc.send_signal(signal.SIGTERM)
                    for file in sorted(self.broken & changed):
                        say(f"{file} changed: starting its agent again")
                        self.broken.discard(file)
                        fresh = await self._start(file)
                        exits[waits.start(fresh.wait())] = fresh
                    changes = waits.start(self._changed())
                for future in [f for f in done if f in exits]:
                    proc = exits.pop(future)
                    replacement = await self._after_exit(proc, proc.returncode or 0, signals)
                    if replacement is not None:
                        exits[waits.start(replacement.wait())] = replacement
        finally:
            await waits.aclose()

    async def _after_exit(
        self, proc: asyncio.subprocess.Process, code: int, signals: Signals
    ) -> asyncio.subprocess.Process | None:
        file = self.files.pop(proc)
        loop = asyncio.get_running_loop()
        lived = loop.time() - self.started.pop(proc)
        replaced = proc in self.replacing
        self.replacing.discard(proc)
        if not replaced:
            say(f"an agent process ({file}) exited with {code}")
            if self.watch and code != 0:
                self.broken.add(file)  # fixing the file is what will bring it back
                say(f"waiting for the next save of {file}")
                return None
            if self.policy == "never" or (self.policy == "on-failure" and code == 0):
                return None
            delay = 0.0 if lived > HEALTHY_AFTER else self.backoff.get(file, 0.5)
            self.backoff[file] = min(MAX_BACKOFF, max(delay, 0.5) * 2)
            if delay:
                say(f"restarting it in {delay:g} s")
                if not await unless(signals.stop, asyncio.sleep(delay)):
                    return None
        return await self._start(file)

    async def _start(self, file: str) -> asyncio.subprocess.Process:
        loop = asyncio.get_running_loop()
        new = await self.spawn(file)
        self.procs.append(new)
        try:
            ready = await ready_line(new)
        except SystemExit as exc:
            say(str(exc).removeprefix("sessionmesh: "))
            ready = None
        if ready is not None:
            self.output.ready(new, ready)
            say(f"agent {ready['agent']} (instance {ready['instance']}) up on {ready['address']}")
        self.files[new] = file
        self.started[new] = loop.time()
        return new

    async def _changed(self) -> set[str]:
        return await _changed(sorted(set(self.files.values()) | self.broken))


async def _changed(files: list[str]) -> set[str]:
    """The files among ``files`` that changed next (``--watch``, through watchfiles)."""
    try:
        from watchfiles import awatch
    except ImportError:
        raise SystemExit(
            "sessionmesh: --watch needs watchfiles: pip install 'sessionmesh[watch]'"
        ) from None
    wanted = _real_paths(files)
    async for batch in awatch(*{os.path.dirname(p) for p in wanted}):
        hit = {wanted[p] for p in _real_paths([path for _, path in batch]) if p in wanted}
        if hit:
            return hit
    return set()


def _real_paths(paths: list[str]) -> dict[str, str]:
    """Each path by its real path (string work and one stat each: never long enough to
    matter to the loop)."""
    return {os.path.realpath(p): p for p in paths}


async def stop_all(procs: Sequence[asyncio.subprocess.Process], signals: Signals) -> None:
    """SIGTERM: each agent drains, then stops. A second Ctrl-C (or SIGTERM) is passed on:
    the agents stop at once, still closing their sessions."""
    live = [p for p in procs if p.returncode is None]
    for proc in live:
        proc.send_signal(signal.SIGTERM)
    if live and not await unless(signals.hurry, all_exit(live)):
        say("stopping the agents now")
        for proc in live:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
    for proc in live:
        try:
            await asyncio.wait_for(proc.wait(), 60)
        except TimeoutError:
            proc.kill()
            await proc.wait()
    for proc in procs:
        if proc.stdin is not None:
            proc.stdin.close()


async def all_exit(procs: Sequence[asyncio.subprocess.Process]) -> None:
    await asyncio.gather(*(p.wait() for p in procs))


# -- the parser -------------------------------------------------------------------------------
