"""``python -m aioancillary serve`` end to end: the runner and its workers as real processes,
real HTTP clients counting every request's outcome.

The load tests first check pipelining, a 10 MB request body and a client that leaves
mid-request through the workers, then send HUP, TTIN and TTOU under continuous load
(keep-alive clients and a new connection per request) and require that no request is refused,
reset or lost; then TERM, after which new connections are refused (or reset, never accepted)
and nothing else fails, the runner exits 0 and no worker is left. The other tests cover the
exit statuses, systemd (sockets by name from LISTEN_FDS, READY/RELOADING/STOPPING/STATUS/
WATCHDOG), unix and IPv6 binds, the protocol and handler interfaces, --worker-init and the
workers' logs.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from helpers import LOOP_NAMES
from helpers.http_load import HttpLoad, LoadResult, read_response, request
from helpers.serve_runner import TESTS, gone, start_runner

APPS = {"asgi": "helpers.serve_apps:app", "aiohttp": "helpers.serve_apps:make_aiohttp_app"}


def run(test: Callable[[], Awaitable[None]], timeout: float = 240) -> None:
    asyncio.run(asyncio.wait_for(test(), timeout))


async def get(address: tuple[str, int] | str, path: str = "/") -> tuple[int, dict[str, str], bytes]:
    if isinstance(address, str):
        reader, writer = await asyncio.open_unix_connection(address)
    else:
        reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(request(path, close=True))
        return await asyncio.wait_for(read_response(reader), 30)
    finally:
        writer.close()
        await writer.wait_closed()


async def http_through_the_runner(address: tuple[str, int], events: Path) -> None:
    """Pipelining, a 10 MB body and a client that leaves mid-request, through real workers."""
    reader, writer = await asyncio.open_connection(*address)
    writer.write(b"".join(request(path) for path in ["/", "/state", "/"] * 4))
    bodies = [(await asyncio.wait_for(read_response(reader), 30))[2] for _ in range(12)]
    assert bodies[0::3] == [b"hello"] * 4  # in order, on one connection
    assert len({*bodies[1::3]}) == 1  # one worker, its lifespan state
    body = os.urandom(10 * 1024 * 1024)
    writer.write(request("/echo", body=body))
    status, _headers, answer = await asyncio.wait_for(read_response(reader), 60)
    assert (status, answer) == (200, f"{len(body)} {zlib.crc32(body)}".encode())
    writer.close()
    await writer.wait_closed()
    reader, writer = await asyncio.open_connection(*address)
    writer.write(request("/echo", body=body)[:-9_000_000])  # then leaves, 9 MB short
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    deadline = time.monotonic() + 30
    while not any(p.name.endswith(".disconnect") for p in events.iterdir()):
        assert time.monotonic() < deadline, "the application never saw the client leave"
        await asyncio.sleep(0.05)
    assert (await get(address))[2] == b"hello"  # and serving goes on


def no_losses(result: LoadResult) -> None:
    assert result.failures == [], f"{len(result.failures)} failed: {result.failures[:10]}"


@pytest.mark.timeout(240)
@pytest.mark.parametrize("accept", ["runner", "workers"])
@pytest.mark.parametrize("loop_name", LOOP_NAMES)
@pytest.mark.parametrize("interface", ["asgi", "aiohttp"])
def test_signals_under_load_lose_no_request(
    interface: str, loop_name: str, accept: str, tmp_path: Path
) -> None:
    """The same checks whoever accepts: the runner handing connections over (the default), or
    the workers on their copies of the listeners (``--accept workers``)."""
    events = tmp_path / "events"
    events.mkdir()

    async def test() -> None:
        runner = await start_runner(
            tmp_path,
            APPS[interface],
            "--interface",
            interface,
            "--workers",
            "2",
            "--bind",
            "127.0.0.1:0",
            "--loop",
            loop_name,
            "--accept",
            accept,
            env={"SERVE_TEST_EVENTS": str(events)},
        )
        try:
            await runner.ready()
            address = ("127.0.0.1", runner.port())
            await http_through_the_runner(address, events)
            keep_alive = HttpLoad(address, connections=12, mode="keep-alive")
            per_request = HttpLoad(address, connections=4, mode="close")
            loads = [keep_alive, per_request]
            for load in loads:
                load.start()
            await keep_alive.wait_ok(200)
            await per_request.wait_ok(50)
            first = runner.workers()
            assert len(first) == 2

            async def step(sig: signal.Signals, done: Callable[[], bool]) -> None:
                runner.send(sig)
                await runner.wait_for(done)
                for load in loads:
                    await load.wait_ok(100)

            def ready_count() -> int:
                return sum("READY" in n for n in runner.notifications)

            readies = ready_count()
            await step(signal.SIGHUP, lambda: ready_count() > readies)
            assert not set(runner.workers()) & set(first)
            await step(signal.SIGTTIN, lambda: len(runner.workers()) == 3)
            await step(signal.SIGTTOU, lambda: len(runner.workers()) == 2)
            for load in loads:
                no_losses(await load.stop())
            served = keep_alive.result.servers + per_request.result.servers
            assert len(served) >= 4  # both generations of the reload, and the added worker

            # TERM under load: the listeners close, so new connections are refused; a request
            # on a connection the server had already answered on is answered too. A fresh
            # connection may be reset instead of refused: the kernel completes a handshake
            # before anyone accepts, and closing a listener resets what it queued but was
            # not accepted (with TCP_DEFER_ACCEPT, one whose request had not arrived yet).
            for load in loads:
                load.result = LoadResult()
                load.start()
                await load.wait_ok(50)
            runner.send(signal.SIGTERM)
            assert await runner.wait_exit() == 0
            for load in loads:
                result = await load.stop()
                assert result.ok > 0
                cut = [f for f in result.failures if f.requests_before or f.kind != "refused"]
                assert [f for f in cut if f.requests_before or f.kind != "reset"] == [], cut[:10]
            assert "STOPPING" in runner.notifications[-1]
            assert runner.pids_seen
            assert all(gone(pid) for pid in runner.pids_seen)
            assert not [line for line in runner.lines if "lost" in line or "Traceback" in line]
        finally:
            await runner.close()

    run(test)


def test_an_app_that_cannot_be_imported_exits_4(tmp_path: Path) -> None:
    async def test() -> None:
        runner = await start_runner(tmp_path, "helpers.no_such_module:app", "--bind", "127.0.0.1:0")
        try:
            assert await runner.wait_exit() == 4
        finally:
            await runner.close()
        text = "\n".join(runner.lines)
        assert "cannot import the application 'helpers.no_such_module:app'" in text
        assert "no module named 'helpers.no_such_module'" in text

    run(test)


def test_a_missing_attribute_exits_4(tmp_path: Path) -> None:
    async def test() -> None:
        runner = await start_runner(tmp_path, "helpers.serve_apps:nope", "--bind", "127.0.0.1:0")
        try:
            assert await runner.wait_exit() == 4
        finally:
            await runner.close()
        assert "module 'helpers.serve_apps' has no attribute 'nope'" in "\n".join(runner.lines)

    run(test)


@pytest.mark.parametrize("interface", ["asgi", "aiohttp"])
def test_a_failing_startup_exits_3(interface: str, tmp_path: Path) -> None:
    async def test() -> None:
        runner = await start_runner(
            tmp_path,
            APPS[interface],
            "--interface",
            interface,
            "--workers",
            "2",
            "--bind",
            "127.0.0.1:0",
            env={"SERVE_TEST_FAIL_STARTUP": "1"},
        )
        try:
            assert await runner.wait_exit() == 3
        finally:
            await runner.close()
        assert any("startup failed" in line for line in runner.lines), runner.lines

    run(test)


def test_a_port_already_taken_exits_1(tmp_path: Path) -> None:
    taken = socket.create_server(("127.0.0.1", 0))

    async def test() -> None:
        port = taken.getsockname()[1]
        runner = await start_runner(tmp_path, APPS["asgi"], "--bind", f"127.0.0.1:{port}")
        try:
            assert await runner.wait_exit() == 1
        finally:
            await runner.close()
        text = "\n".join(runner.lines)
        assert f"cannot listen on 127.0.0.1:{port}: address already in use" in text

    try:
        run(test)
    finally:
        taken.close()


def test_a_failed_reload_keeps_the_old_workers_serving(tmp_path: Path) -> None:
    broken = tmp_path / "broken"

    async def test() -> None:
        runner = await start_runner(
            tmp_path,
            APPS["asgi"],
            "--workers",
            "2",
            "--bind",
            "127.0.0.1:0",
            env={"SERVE_TEST_FAIL_STARTUP": str(broken)},
        )
        try:
            await runner.ready()
            address = ("127.0.0.1", runner.port())
            old = runner.workers()
            broken.touch()  # the new workers' startup fails
            mark = len(runner.lines)
            runner.send(signal.SIGHUP)
            await runner.wait_log("reload failed, the old workers serve on", mark)
            await runner.wait_for(
                lambda: "reload failed" in runner.notifications[-1].get("STATUS", "")
            )
            assert runner.workers() == old
            pids = {int((await get(address))[1]["x-pid"]) for _ in range(10)}
            assert pids <= set(old)
            runner.send(signal.SIGTERM)
            assert await runner.wait_exit() == 0
        finally:
            await runner.close()

    run(test)


@pytest.mark.parametrize("accept", ["runner", "workers"])
def test_systemd_sockets_by_name_and_notifications(accept: str, tmp_path: Path) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    # sd_listen_fds() wants LISTEN_PID == getpid(): set by a wrapper that moves the socket to
    # fd 3 (SD_LISTEN_FDS_START) and execs the runner in its own process.
    fd = listener.fileno()
    wrapper = [
        sys.executable,
        "-c",
        f"import os, sys; os.dup2({fd}, 3); os.close({fd}); "
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1', LISTEN_FDNAMES='web'); "
        "os.execv(sys.argv[1], sys.argv[1:])",
    ]

    async def test() -> None:
        runner = await start_runner(
            tmp_path,
            APPS["asgi"],
            "--bind",
            f"web=127.0.0.1:{port}",  # taken (by the inherited socket): it must be adopted
            "--workers",
            "2",
            "--accept",
            accept,
            command=wrapper,
            pass_fds=[listener.fileno()],
            env={"WATCHDOG_USEC": "400000"},
        )
        listener.close()
        try:
            await runner.ready()
            assert "listening on web (inherited)" in "\n".join(runner.lines)
            status, headers, body = await get(("127.0.0.1", port))
            assert (status, body) == (200, b"hello")
            assert int(headers["x-pid"]) in runner.workers()
            await runner.wait_for(lambda: sum("WATCHDOG" in n for n in runner.notifications) >= 2)
            start = len(runner.notifications)
            runner.send(signal.SIGHUP)
            reloading = await runner.wait_notify("RELOADING", start)
            assert reloading["RELOADING"] == "1"
            assert int(reloading["MONOTONIC_USEC"]) > 0
            await runner.wait_notify("READY", start)
            runner.send(signal.SIGTERM)
            assert await runner.wait_exit() == 0
            keys = [set(n) - {"MONOTONIC_USEC"} for n in runner.notifications]
            assert {"READY", "STATUS"} in keys
            assert {"STOPPING", "STATUS"} in keys
            assert re.search(
                r"serving on web with 2 worker\(s\): \[\d+, \d+\]", str(runner.notifications)
            )
        finally:
            await runner.close()

    run(test)


@pytest.mark.parametrize("loop_name", LOOP_NAMES)
@pytest.mark.parametrize("accept", ["runner", "workers"])
def test_unix_and_ipv6_binds(accept: str, loop_name: str, tmp_path: Path) -> None:
    path = str(tmp_path / "app.sock")
    ipv6 = socket.has_ipv6
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        ipv6 = False

    async def test() -> None:
        binds = ["--bind", f"unix:{path}", "--bind", "127.0.0.1:0"]
        if ipv6:
            binds += ["--bind", "[::1]:0"]
        runner = await start_runner(
            tmp_path,
            APPS["aiohttp"],
            "--interface",
            "aiohttp",
            "--accept",
            accept,
            "--loop",
            loop_name,
            *binds,
        )
        try:
            await runner.ready()
            assert (await get(path))[2] == b"hello"
            assert (await get(("127.0.0.1", runner.port())))[2] == b"hello"
            if ipv6:
                line = await runner.wait_log(r"\[::1\]:\d+")
                port6 = int(re.search(r"\[::1\]:(\d+)", line).group(1))  # type: ignore[union-attr]
                assert (await get(("::1", port6)))[2] == b"hello"
            runner.send(signal.SIGINT)
            assert await runner.wait_exit() == 0
            assert not os.path.exists(path)  # the runner removes the socket file it made
        finally:
            await runner.close()

    run(test)


@pytest.mark.parametrize("accept", ["runner", "workers"])
@pytest.mark.parametrize(
    ("interface", "app"),
    [
        ("protocol", "helpers.serve_apps:EchoProtocol"),
        ("handler", "helpers.serve_apps:echo_handler"),
    ],
)
def test_protocol_and_handler_interfaces_with_worker_init(
    interface: str, app: str, accept: str, tmp_path: Path
) -> None:
    events = tmp_path / "events"
    events.mkdir()

    async def test() -> None:
        runner = await start_runner(
            tmp_path,
            app,
            "--interface",
            interface,
            "--workers",
            "2",
            "--bind",
            "127.0.0.1:0",
            "--worker-init",
            "helpers.serve_apps:worker_init",
            "--accept",
            accept,
            env={"SERVE_TEST_EVENTS": str(events)},
        )
        try:
            await runner.ready()
            workers = runner.workers()
            seen = set()
            for n in range(10):
                reader, writer = await asyncio.open_connection("127.0.0.1", runner.port())
                writer.write(b"line %d\n" % n)
                pid, text = (await asyncio.wait_for(reader.readline(), 30)).split(b" ", 1)
                assert text == b"line %d\n" % n
                seen.add(int(pid))
                writer.close()
                await writer.wait_closed()
            assert seen <= set(workers)
            assert sorted(p.name for p in events.iterdir()) == sorted(f"{w}.init" for w in workers)
            runner.send(signal.SIGTERM)
            assert await runner.wait_exit() == 0
        finally:
            await runner.close()

    run(test)


def test_worker_logs_go_to_the_runners_stderr_with_their_pid(tmp_path: Path) -> None:
    async def test() -> None:
        runner = await start_runner(
            tmp_path, APPS["asgi"], "--workers", "2", "--bind", "127.0.0.1:0", "--access-log"
        )
        try:
            await runner.ready()
            workers = runner.workers()
            _status, headers, _ = await get(("127.0.0.1", runner.port()), "/state")
            pid = int(headers["x-pid"])
            line = await runner.wait_log(r'"GET /state HTTP/1.1" 200')
            assert f"[{pid}]" in line
            for worker in workers:
                assert any(
                    f"[{worker}]" in line and "Application startup complete" in line
                    for line in runner.lines
                )
            assert any(f"[{runner.pid}]" in line and "serving" in line for line in runner.lines)
            runner.send(signal.SIGTERM)
            assert await runner.wait_exit() == 0
        finally:
            await runner.close()

    run(test)


def test_serve_help_and_usage_errors() -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "aioancillary", "serve", *args],
            capture_output=True,
            check=False,
            text=True,
            cwd=TESTS,
            timeout=60,
        )

    done = cli("--help")
    assert done.returncode == 0
    for option in (
        "--interface",
        "--bind",
        "--workers",
        "--loop",
        "--worker-init",
        "--graceful-timeout",
    ):
        assert option in done.stdout
    assert cli().returncode == 2
    bad = cli("app:app", "--bind", "localhost")
    assert bad.returncode == 2
    assert "expected HOST:PORT, [IPV6]:PORT or unix:PATH" in bad.stderr
    assert cli("app:app", "--interface", "wsgi").returncode == 2
    assert cli("no_colon").returncode == 2
