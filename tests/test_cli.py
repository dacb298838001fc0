"""`sessionmesh serve` as a real process: address, reflection-free calls, graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import selectors
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from sessionmesh import mesh
from sessionmesh.testing import eventually
from sessionmesh.v1 import session_service_pb2 as pb
from sessionmesh.v1 import session_service_pb2_grpc as pb_grpc
from tests.procs import CLI, ROOT, exited, process_blocking, serve, system_tool, wait_until

pytestmark = pytest.mark.anyio


async def test_serve_then_sigterm_finishes_calls_and_closes_sessions(tmp_path: Path) -> None:
    log = tmp_path / "closed.txt"
    started = tmp_path / "started.txt"
    log.touch()
    started.touch()
    env = {"CLOSE_LOG": str(log), "STARTED_LOG": str(started)}
    async with serve("tests/agents/closing.py", env=env) as (proc, ready):
        assert ready["agent"] == "closing"
        assert ready["address"].startswith("127.0.0.1:")
        async with mesh.connect(ready["address"]) as client:
            assert {t["name"] for t in await client.list_tools()} == {"remember", "slow"}
            left_open = client.proxy("remember", session_required=True)
            assert await left_open(value="a") == "a"
            in_flight = asyncio.create_task(client.proxy("slow")(seconds=0.5))
            await eventually(lambda: started.read_text() == "slow\n", what="the slow call runs")
            proc.send_signal(signal.SIGTERM)
            assert await in_flight == "finished"
        assert await exited(proc) == 0
    assert log.read_text() == "a\n"  # the open session was closed, its callback ran once


async def test_agents_run_on_uvloop_when_it_is_installed_unless_told_not_to() -> None:
    # The dev install has sessionmesh[fast]; SESSIONMESH_LOOP=asyncio opts out.
    async with serve("examples/counter.py") as (_, on_uvloop):
        async with serve("examples/counter.py", env={"SESSIONMESH_LOOP": "asyncio"}) as (_, plain):
            assert (on_uvloop["loop"], plain["loop"]) == ("uvloop", "asyncio")
            for ready in (on_uvloop, plain):
                async with mesh.connect(ready["address"]) as client:
                    counter = client.proxy("session_counter", session_required=True)
                    assert [(await counter(increment=n))["count"] for n in (1, 2)] == [1, 3]
                    await counter.cleanup_auto_session()
        with mesh.connect_sync(on_uvloop["address"]) as blocking:  # its loop thread: uvloop
            with blocking.proxy("session_counter", session_required=True) as counter_:
                assert counter_(increment=2)["count"] == 2


def test_serve_reports_a_file_without_tools(tmp_path: Path) -> None:
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    out = subprocess.run(
        [*CLI, "serve", str(empty)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode != 0
    assert "no @mesh.tool functions found" in out.stderr


def _cli(*args: str, registry: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SESSIONMESH_REGISTRY": registry},
    )


def _stopped(address: str) -> bool:
    with socket.socket() as s:
        return s.connect_ex(tuple_address(address)) != 0


def tuple_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


@pytest.mark.slow
def test_run_then_list_call_sessions_and_ctrl_c() -> None:
    files = ("examples/counter.py", "examples/consumer.py")
    with process_blocking(
        "run", *(str(ROOT / f) for f in files), "--replicas", "2", "--registry-port", "0"
    ) as (run, ready):
        registry = ready["registry"]
        assert registry.startswith("127.0.0.1:")
        assert sorted(a["agent"] for a in ready["agents"]) == [
            "consumer",
            "consumer",
            "counter",
            "counter",
        ]

        listed = json.loads(_cli("list", "--json", registry=registry).stdout)
        assert sorted(r["agent"] for r in listed) == ["consumer", "consumer", "counter", "counter"]
        assert all(r["state"] == "serving" for r in listed)
        assert (
            "session_counter" in next(r for r in listed if r["agent"] == "counter")["capabilities"]
        )
        table = _cli("list", registry=registry).stdout
        assert table.splitlines()[0].split() == [
            "AGENT",
            "INSTANCE",
            "ENDPOINT",
            "STATE",
            "SESSIONS",
            "CAPABILITIES",
        ]

        called = _cli("call", "auto_session_test", '{"test_rounds": 3}', registry=registry)
        assert called.returncode == 0, called.stderr
        assert [r["response"]["count"] for r in json.loads(called.stdout)["results"]] == [1, 3, 6]

        streamed = _cli("call", "stream_count", '{"n": 3}', registry=registry)
        assert [json.loads(line)["i"] for line in streamed.stdout.splitlines()] == [1, 2, 3]

        bad = _cli("call", "session_counter", '{"increment": "x"}', registry=registry)
        assert bad.returncode == 1
        assert "INVALID_ARGUMENTS" in bad.stderr and "increment" in bad.stderr
        assert bad.stdout == ""
        missing = _cli("call", "nope", registry=registry)
        assert missing.returncode == 1 and "no live provider of 'nope'" in missing.stderr
        not_json = _cli("call", "session_counter", "{oops", registry=registry)
        assert not_json.returncode == 1 and "not JSON" in not_json.stderr

        sessions = _cli("sessions", "counter", registry=registry)
        assert sessions.returncode == 0
        assert sessions.stdout.count("0 open session(s)") == 2
        as_json = json.loads(_cli("sessions", "--json", registry=registry).stdout)
        assert sorted(r["agent"] for r in as_json) == ["consumer", "consumer", "counter", "counter"]
        assert all(r["sessions"] == [] for r in as_json)
        # Sessions move between the two counter replicas, by count and by id.
        counters = sorted(r["instance"] for r in listed if r["agent"] == "counter")
        ids = [_cli("open", "session_counter", registry=registry).stdout.strip() for _ in range(4)]

        def held() -> dict[str, int]:
            listing = _cli("sessions", "counter", "--json", registry=registry).stdout
            return {r["instance"]: len(r["sessions"]) for r in json.loads(listing)}

        on_second = held()[counters[1]]  # each `open` is a new client: spread at random
        to_first = _cli(
            "sessions", "move", "counter", "--to", counters[0], "--count", "9", registry=registry
        )
        assert to_first.returncode == 0, to_first.stderr
        assert to_first.stdout.startswith(f"moved {on_second} session(s) of counter to")
        assert held() == {counters[0]: 4, counters[1]: 0}
        one = _cli(
            "sessions",
            *("move", "counter", "--to", counters[1], "--session", ids[0], "--json"),
            registry=registry,
        )
        assert json.loads(one.stdout) == {"moved": 1, "stayed": []}
        for sid in ids:  # closed where each one lives now
            assert _cli("close", sid, registry=registry).returncode == 0
        assert "0 open session(s)" in _cli("sessions", "counter", registry=registry).stdout
        wrong = _cli("sessions", "move", "counter", "--to", "nobody", registry=registry)
        assert wrong.returncode != 0 and "not a serving replica" in wrong.stderr
        version = _cli("--version", registry=registry)
        assert version.returncode == 0 and version.stdout.startswith("sessionmesh ")

        run.send_signal(signal.SIGINT)
        assert run.wait(timeout=60) == 0
    assert all(_stopped(a["address"]) for a in ready["agents"])  # every agent process stopped
    assert _stopped(registry)


def test_call_without_a_registry_says_what_to_do(free_tcp_port: int) -> None:
    out = _cli("call", "x", "--wait", "0.5", registry=f"127.0.0.1:{free_tcp_port}")
    assert out.returncode == 1
    assert "no answer from the registry" in out.stderr


@pytest.mark.slow
def test_the_demo_runs_and_shows_auto_sessions() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples/demo.py")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "counts [1, 3, 6], in 1 session(s)" in out.stdout
    assert "mesh stopped" in out.stdout


@pytest.mark.slow
def test_agents_started_by_run_do_not_outlive_it() -> None:
    with process_blocking("run", str(ROOT / "examples/counter.py"), "--registry-port", "0") as (
        run,
        ready,
    ):
        agent = ready["agents"][0]["address"]
        os.kill(run.pid, signal.SIGKILL)  # no chance to stop its children
        run.wait(timeout=10)
        wait_until(lambda: _stopped(agent), within=30, what="the agent stops with `run`")


async def test_a_server_on_a_taken_port_fails_loudly_without_a_traceback(reg: str) -> None:
    port = reg.rpartition(":")[2]
    counter = str(ROOT / "examples/counter.py")
    for args in (
        ["registry", "--port", port],
        ["run", "--registry-port", port, counter],
        ["serve", counter, "--port", port],
        ["serve", counter, "--metrics-port", port],
    ):
        proc = await asyncio.create_subprocess_exec(
            *CLI, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), 30)
        finally:
            if proc.returncode is None:  # it bound the port after all, and serves on
                proc.kill()
                await proc.wait()
        assert proc.returncode != 0, (args, out)
        assert f":{port}: " in err.decode() and "in use" in err.decode(), err
        assert "Traceback" not in err.decode(), err


async def test_output_cut_short_by_the_reader_is_not_an_error(reg: str) -> None:
    installed = Path(sys.executable).parent / "sessionmesh"  # the console script, not -m
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written: `| head -0`
    proc = await asyncio.create_subprocess_exec(
        str(installed), "list", "--registry", reg, stdout=write, stderr=asyncio.subprocess.PIPE
    )
    os.close(write)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err
    assert b"Traceback" not in err and b"BrokenPipe" not in err, err


async def test_a_second_ctrl_c_stops_run_at_once_and_still_closes_sessions(
    tmp_path: Path,
) -> None:
    log = tmp_path / "run.log"
    with log.open("wb") as stderr:
        run = await asyncio.create_subprocess_exec(
            *CLI,
            "run",
            str(ROOT / "examples/counter.py"),
            "--registry-port",
            "0",
            "--drain-timeout",
            "300",  # without the second Ctrl-C this would wait five minutes
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            start_new_session=True,
        )
        try:
            assert run.stdout is not None
            ready = json.loads(await asyncio.wait_for(run.stdout.readline(), 30))
            async with mesh.connect(registry=ready["registry"]) as client:
                await client.ready()
                counter = client.proxy("session_counter", session_required=True)
                assert (await counter(increment=4))["count"] == 4  # left open, idle
                run.send_signal(signal.SIGINT)
                await eventually(
                    lambda: all(i.state == 2 for i in client.instances()),
                    what="the agent drains",
                )
                run.send_signal(signal.SIGINT)
                assert await exited(run, within=30) == 0
        finally:
            if run.returncode is None:
                os.killpg(run.pid, signal.SIGKILL)
                await run.wait()
    text = log.read_text()
    assert "closed at count 4" in text  # the open session was closed, its callback ran
    assert "Traceback" not in text and "Event loop is closed" not in text, text
    assert all(_stopped(a["address"]) for a in ready["agents"])


async def test_no_log_line_of_an_agent_carries_a_whole_session_id(tmp_path: Path) -> None:
    log = tmp_path / "agent.log"
    with log.open("wb") as stderr:
        agent = await asyncio.create_subprocess_exec(
            *CLI,
            "serve",
            str(ROOT / "examples/counter.py"),
            "--session-ttl",
            "0.2",
            "--debug",
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
        )
        try:
            assert agent.stdout is not None
            address = json.loads(await asyncio.wait_for(agent.stdout.readline(), 30))["address"]
            ids: list[str] = []
            async with mesh.connect(address) as client:
                counter = client.proxy("session_counter", session_required=True)
                await counter(increment=1)  # created, reused, closed
                await counter(increment=1)
                ids.append(str(counter.session_id))
                await counter.cleanup_auto_session()
                expiring = client.proxy("session_counter", session_required=True)
                await expiring(increment=1)  # expires (TTL 0.2 s), then lost
                ids.append(str(expiring.session_id))
                await eventually(lambda: _none_open(client), what="the session expires")
                with pytest.raises(mesh.errors.SessionLost):
                    await expiring(increment=1)
            async with grpc.aio.insecure_channel(address) as channel:
                stub = pb_grpc.SessionServiceStub(channel)
                sid = ids[0]
                for metadata in (
                    (("x-session-id", sid),),
                    (("x-session-id", " " + sid),),
                    (("x-session-id", sid * 300),),
                    (("x-session-id", sid), ("x-session-id", sid + "x")),
                    (("x-session-id", sid + "\n"),),  # refused by the client library
                ):
                    with contextlib.suppress(grpc.RpcError, Exception):
                        await stub.Call(
                            pb.CallRequest(tool="session_counter"), metadata=metadata, timeout=5
                        )
        finally:
            agent.send_signal(signal.SIGTERM)
            await exited(agent)
    text = log.read_text(errors="replace")
    assert "session" in text and "expired" in text  # the lifecycle is logged ...
    for whole in ids:
        assert whole not in text, f"a whole session id in the agent's log:\n{text}"
        assert whole[:14] in text  # ... with ids shortened


async def _none_open(client: mesh.AgentClient) -> bool:
    return not (await client.list_sessions()).sessions


def test_a_file_that_fails_to_import_is_reported_in_one_line(tmp_path: Path) -> None:
    broken = tmp_path / "broken.py"
    broken.write_text("from sessionmesh import mesh\n\nimport no_such_module_here\n")
    out = subprocess.run([*CLI, "serve", str(broken)], capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines() == [
        f"sessionmesh: {broken}:3: ModuleNotFoundError: No module named 'no_such_module_here'"
    ]


def test_a_session_spans_several_calls_from_the_shell(tmp_path: Path) -> None:
    with process_blocking("run", str(ROOT / "examples/counter.py"), "--registry-port", "0") as (
        _,
        ready,
    ):
        registry = ready["registry"]
        opened = _cli("open", "session_counter", registry=registry)
        assert opened.returncode == 0, opened.stderr
        sid = opened.stdout.strip()
        counts = []
        for n in (1, 2):
            called = _cli(
                "call",
                "session_counter",
                f'{{"increment": {n}}}',
                "--session",
                sid,
                registry=registry,
            )
            assert called.returncode == 0, called.stderr
            counts.append(json.loads(called.stdout)["count"])
        assert counts == [1, 3]  # one session across two processes
        listed = json.loads(_cli("list", "--json", "--tools", registry=registry).stdout)
        [increment] = [t for t in listed[0]["tools"] if t["name"] == "increment"]
        assert increment["session_required"] is True
        assert set(increment["parameters"]["properties"]) == {"increment", "amount", "operation"}
        for _ in range(3):  # the same every time: the signature's order, not the wire's
            table = _cli("list", "--tools", registry=registry).stdout
            assert (
                'increment(increment: int = 1, amount: int | None = None, operation: "increment"'
                ' | "get" = "increment") -> dict[str, int | str]  [session_counter, session]'
            ) in table, table
        assert "stream_count(start: int = 1, n: int = 3) -> dict[str, int]" in table
        # A stream inside a session opened by another command, and an agent called directly.
        chunks = _cli("call", "stream_count", '{"n": 2}', "--session", sid, registry=registry)
        assert chunks.returncode == 0, chunks.stderr
        assert [json.loads(line) for line in chunks.stdout.splitlines()] == [
            {"count": 3, "i": 1},
            {"count": 3, "i": 2},
        ]
        agent = ready["agents"][0]["address"]
        direct = subprocess.run(
            [*CLI, "call", "-v", "session_counter", "-", "--agent", agent],
            input='{"increment": 5}',
            capture_output=True,
            text=True,
            timeout=60,
            env={k: v for k, v in os.environ.items() if k != "SESSIONMESH_REGISTRY"},
        )
        assert direct.returncode == 0, direct.stderr
        assert json.loads(direct.stdout)["count"] == 5
        assert "DEBUG" in direct.stderr  # -v after the subcommand counts too
        (tmp_path / "args.json").write_text('{"increment": 2}')
        from_file = _cli(
            "call",
            "session_counter",
            f"@{tmp_path / 'args.json'}",
            "--session",
            sid,
            registry=registry,
        )
        assert json.loads(from_file.stdout)["count"] == 5, from_file.stderr
        assert _cli("close", sid, registry=registry).returncode == 0
        again = _cli("call", "session_counter", "{}", "--session", sid, registry=registry)
        assert again.returncode == 1
        assert "SESSION_NOT_FOUND" in again.stderr
        assert _cli("close", sid, registry=registry).returncode == 1


def _instances(registry: str) -> set[str]:
    out = _cli("list", "--json", registry=registry)
    return {r["instance"] for r in json.loads(out.stdout)} if out.returncode == 0 else set()


def test_run_restarts_an_agent_that_dies() -> None:
    with process_blocking("run", str(ROOT / "examples/counter.py"), "--registry-port", "0") as (
        _,
        ready,
    ):
        registry = ready["registry"]
        [agent] = ready["agents"]
        os.kill(agent["pid"], signal.SIGKILL)
        wait_until(
            lambda: len(_instances(registry) - {agent["instance"]}) == 1,
            within=20,
            what="a new counter instance replaces the killed one",
        )


def test_run_watch_restarts_the_agents_of_a_file_that_changed(tmp_path: Path) -> None:
    counter = tmp_path / "counter.py"
    counter.write_text((ROOT / "examples/counter.py").read_text())
    with process_blocking("run", str(counter), "--registry-port", "0", "--watch") as (_, ready):
        registry = ready["registry"]
        [agent] = ready["agents"]
        written = [0.0]

        def restarted() -> bool:
            # The watcher may start just after the ready line: change the file again if a
            # change went unseen for a while (each one restarts the agent once).
            if time.monotonic() - written[0] > 5:
                with counter.open("a") as f:
                    f.write("# changed\n")
                written[0] = time.monotonic()
            return bool(_instances(registry) - {agent["instance"]})

        wait_until(restarted, within=30, what="the changed file's agent is restarted")


def test_run_passes_on_what_its_agents_print_each_line_with_its_agent(tmp_path: Path) -> None:
    noisy = tmp_path / "noisy.py"
    noisy.write_text(
        "from sessionmesh import mesh\n\n\n"
        "@mesh.tool\n"
        "def shout(text: str) -> str:\n"
        "    print(f'the tool says {text}')\n"
        "    return text\n"
    )
    with process_blocking("run", str(noisy), "--registry-port", "0") as (run, ready):
        [agent] = ready["agents"]
        called = _cli("call", "shout", '{"text": "hi"}', registry=ready["registry"])
        assert called.returncode == 0, called.stderr
        assert run.stdout is not None
        with selectors.DefaultSelector() as readable:
            readable.register(run.stdout, selectors.EVENT_READ)
            assert readable.select(20), "nothing passed on within 20 s"
            line = run.stdout.readline()
        assert line == f"[noisy {agent['instance']}] the tool says hi\n"


def test_log_lines_as_json_for_machines(tmp_path: Path) -> None:
    broken = tmp_path / "broken.py"
    broken.write_text("x = 1\n")
    out = subprocess.run(
        [*CLI, "--log-format", "json", "serve", str(broken)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode != 0
    [line] = out.stderr.strip().splitlines()
    assert "no @mesh.tool functions found" in json.loads(line)["message"]


def test_top_shows_the_mesh_live_in_a_terminal() -> None:
    tmux = system_tool("tmux", "tmux")
    with process_blocking("run", str(ROOT / "examples/counter.py"), "--registry-port", "0") as (
        _,
        ready,
    ):
        registry, [agent] = ready["registry"], ready["agents"]
        server = f"sessionmesh-test-{os.getpid()}"  # a tmux server of this test's own
        top = shlex.join([*CLI, "top", "--registry", registry, "--interval", "0.2"])
        subprocess.run(
            [tmux, "-L", server, "new-session", "-d", "-x", "120", "-y", "20", top], check=True
        )
        try:

            def calls_shown() -> int | None:
                screen = subprocess.run(
                    [tmux, "-L", server, "capture-pane", "-p"], capture_output=True, text=True
                ).stdout
                rows = [line for line in screen.splitlines() if agent["instance"] in line]
                cells = [c.strip() for c in rows[0].split("│") if c.strip()] if rows else []
                return int(cells[-1]) if cells and cells[-1].isdigit() else None

            wait_until(lambda: calls_shown() == 0, within=20, what="top shows the instance")
            with mesh.connect_sync(registry=registry) as client:
                with client.proxy("session_counter", session_required=True) as counter:
                    for _ in range(50):
                        counter(increment=1)
            wait_until(lambda: (calls_shown() or 0) >= 50, within=20, what="top counts the calls")
        finally:
            subprocess.run([tmux, "-L", server, "kill-server"], capture_output=True)


def test_an_agent_that_cannot_register_says_so_and_its_ready_line_tells(tmp_path: Path) -> None:
    # It used to print "serving" and its ready line and say nothing while callers could not
    # find it. Nothing listens on this port: the registration fails at once, every time.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        nobody = f"127.0.0.1:{s.getsockname()[1]}"
    log = tmp_path / "stderr"
    counter = str(ROOT / "examples/counter.py")
    with process_blocking("serve", counter, "--registry", nobody, log=log) as (_, ready):
        assert ready["registered"] is False
        said = log.read_text()
        assert f"cannot register with the registry at {nobody}" in said, said
        assert "UNAVAILABLE" in said
        assert said.count("cannot register") <= 3  # not a line per retry (backoff)


async def test_the_ready_line_comes_once_the_agent_is_registered(reg: str) -> None:
    async with serve("examples/counter.py", "--registry", reg) as (_, ready):
        assert ready["registered"] is True
        async with mesh.connect(registry=reg) as client:
            # Visible at once: no wait between the ready line and the registry's view.
            await client.ready()
            assert ready["instance"] in {i.instance_id for i in client.instances()}


def test_run_with_json_logs_writes_only_json_lines(tmp_path: Path) -> None:
    # Under `run` 11 lines of 16 used to be text: an "[agent id]" prefix, gRPC core's own.
    talker = tmp_path / "talker.py"
    talker.write_text(
        "import logging\n\n"
        "from sessionmesh import mesh\n\n\n"
        "@mesh.tool(session_required=True)\n"
        "def say(session: mesh.Session, word: str) -> str:\n"
        "    print('a tool prints', word)  # text on stdout: passed on as a JSON line\n"
        "    logging.getLogger('talker').warning('said %s', word)  # in its session\n"
        "    return word\n"
    )
    log = tmp_path / "stderr"
    args = ("--log-format", "json", "run", str(talker), "--registry-port", "0")
    with process_blocking(*args, log=log) as (run, ready):
        called = _cli("call", "say", '{"word": "hi"}', registry=ready["registry"])
        assert called.returncode == 0, called.stderr
        run.send_signal(signal.SIGINT)
        out, _ = run.communicate(timeout=60)
    lines = [line for line in (out + log.read_text()).splitlines() if line.strip()]
    not_json = [line for line in lines if not line.startswith("{")]
    assert not not_json, not_json
    records = [json.loads(line) for line in lines]  # every one parses
    said = [r for r in records if "a tool prints hi" in r.get("message", "")]
    assert said and said[0]["agent"] == "talker" and said[0]["instance"]
    agent_logs = [r for r in records if r.get("logger") == "sessionmesh.session"]
    assert agent_logs and all(r["agent"] == "talker" for r in agent_logs)
    assert all(r["time"].endswith("Z") for r in records if "time" in r)
    [logged] = [r for r in records if r.get("logger") == "talker"]
    assert logged["session"] and logged["agent"] == "talker"  # logged inside a session


def test_run_watch_reloads_at_once_and_waits_for_a_fix_after_a_broken_save(
    tmp_path: Path,
) -> None:
    counter = tmp_path / "counter.py"
    good = (ROOT / "examples/counter.py").read_text()
    counter.write_text(good)
    log = tmp_path / "stderr"
    with process_blocking("run", str(counter), "--registry-port", "0", "--watch", log=log) as (
        _,
        ready,
    ):
        registry = ready["registry"]
        [agent] = ready["agents"]
        # An open session used to hold the old code for the 30 s drain.
        assert _cli("open", "session_counter", registry=registry).returncode == 0
        saves = [0.0]

        def save(text: str) -> None:
            counter.write_text(text + f"\n# save {time.monotonic()}\n")
            saves[0] = time.monotonic()

        def saved_and_seen(text: str, seen: Callable[[], bool]) -> Callable[[], bool]:
            def check() -> bool:
                if time.monotonic() - saves[0] > 5:  # the watcher may not see the first save
                    save(text)
                return seen()

            return check

        wait_until(
            saved_and_seen(good, lambda: bool(_instances(registry) - {agent["instance"]})),
            within=20,
            what="the agent reloaded with a session open",
        )
        save("def broken(:\n")
        wait_until(
            lambda: "waiting for the next save" in log.read_text(),
            within=20,
            what="run waits for a fix",
        )
        assert not _instances(registry)  # and retries nothing meanwhile
        wait_until(
            saved_and_seen(good, lambda: bool(_instances(registry))),
            within=20,
            what="the fixed file's agent is back",
        )
        assert log.read_text().count("restarting it in") == 0  # no backoff retries


def test_an_agent_whose_parent_is_gone_exits_even_with_nobody_reading_its_output() -> None:
    # `run` SIGKILLed: the agent's stdin ends (it must stop) and the pipes it writes its
    # notices to have no reader. A notice raised BrokenPipeError, the agent was never
    # stopped, and its gRPC tasks kept the process alive for good (once in ~20 runs of
    # test_agents_started_by_run_do_not_outlive_it).
    agent = subprocess.Popen(
        [*CLI, "serve", str(ROOT / "examples/counter.py"), "--stop-with-parent"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert agent.stdout is not None and agent.stderr is not None and agent.stdin is not None
        with selectors.DefaultSelector() as sel:
            sel.register(agent.stdout, selectors.EVENT_READ)
            assert sel.select(30), "no ready line"
        json.loads(agent.stdout.readline())
        agent.stdout.close()  # nobody reads what it says any more...
        agent.stderr.close()
        agent.stdin.close()  # ...and its parent is gone
        assert agent.wait(timeout=30) == 0
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
            agent.wait(timeout=10)
