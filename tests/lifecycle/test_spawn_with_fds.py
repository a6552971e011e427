"""spawn_with_fds: any program gets the named fds at 3, 4, ... with LISTEN_FDS, LISTEN_FDNAMES
and its own pid in LISTEN_PID (sd_listen_fds(3)); nothing else is inherited; the parent's
fds are untouched.

The programs: a small C program (tests/helpers/listen_fds_check.c, compiled here with the
machine's cc) that checks the protocol itself and serves on fd 3, and a Python program that
adopts its fds with the library's listen_fds(). Both run on each loop. The parent's open fds
are checked by the suite's fd fixture; the children report their own.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import within

from aioancillary import InvalidFdError, SpawnError, spawn_with_fds
from aioancillary._lifecycle import _spawn

HELPERS = Path(__file__).resolve().parents[1] / "helpers"
WAIT = 30.0


@pytest.fixture(scope="module")
def checker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The C program, compiled once per module."""
    cc = shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler (cc) on this machine to build the C test program")
    binary = tmp_path_factory.mktemp("c") / "listen_fds_check"
    subprocess.run(
        [cc, "-Wall", "-Wextra", "-Werror", "-O1", "-o", str(binary),
         str(HELPERS / "listen_fds_check.c")],
        check=True,
        timeout=120,
    )  # fmt: skip
    return binary


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        yield sock


async def ask(port: int) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        return (await within(reader.readline(), WAIT)).decode()
    finally:
        writer.close()
        await writer.wait_closed()


async def test_a_c_program_gets_its_fds_at_3_with_its_own_pid(
    checker: Path, listener: socket.socket
) -> None:
    port = listener.getsockname()[1]
    extra_a, extra_b = socket.socketpair()
    careless_r, careless_w = os.pipe()
    os.set_inheritable(careless_r, True)  # an fd the parent made inheritable: not named
    try:
        proc = await spawn_with_fds(
            [str(checker), "web:pair:pair"], {"web": listener, "pair": [extra_a, extra_b]}
        )
        assert await ask(port) == f"ok pid={proc.pid} fds=3\n"
        assert await within(proc.wait(), WAIT) == 0
        # The parent's fds: open, and as non-inheritable as they were.
        for sock in (listener, extra_a, extra_b):
            assert not os.get_inheritable(sock.fileno())
        assert os.get_inheritable(careless_r)
    finally:
        extra_a.close()
        extra_b.close()
        os.close(careless_r)
        os.close(careless_w)


async def test_the_c_program_starts_with_no_fds_at_all(checker: Path) -> None:
    proc = await spawn_with_fds([str(checker), ""], {}, stderr=asyncio.subprocess.PIPE)
    _, stderr = await within(proc.communicate(), WAIT)
    assert (proc.returncode, stderr) == (0, b"")


async def test_a_python_program_adopts_them_with_listen_fds(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    memfd = os.memfd_create("state")
    a, b = socket.socketpair()
    inodes = {
        "state": [os.fstat(memfd).st_ino],
        "pair": [os.fstat(s.fileno()).st_ino for s in (a, b)],
    }
    try:
        env = {**os.environ, "LISTEN_PID": "1", "LISTEN_FDNAMES": "stale", "LISTEN_PIDFDID": "7"}
        proc = await spawn_with_fds(
            [sys.executable, str(HELPERS / "spawn_apps" / "listen_child.py")],
            {"web": listener, "state": memfd, "pair": (a, b)},
            env=env,
        )
        report = json.loads(await ask(port))
        assert await within(proc.wait(), WAIT) == 0
    finally:
        os.close(memfd)
        a.close()
        b.close()
    assert report["listen_pid"] == str(report["pid"]) == str(proc.pid)
    assert report["names"] == ["web", "state", "pair"]
    assert report["inodes"] == inodes  # the same open files
    # Exactly 0-2 and the four fds (inheritable) were open when it started, and the
    # directory fd of the listing itself.
    assert report["opened"] == [0, 1, 2, 3, 4, 5, 6, 7]
    assert report["inheritable"] == {"3": True, "4": True, "5": True, "6": True}
    assert report["env_left"] == []  # listen_fds() unset them


async def test_exec_failures_raise_as_exec_does(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no-such-program"):
        await spawn_with_fds(["no-such-program-anywhere"], {})
    script = tmp_path / "not-executable"
    script.write_text("#!/bin/sh\n")
    with pytest.raises(PermissionError):
        await spawn_with_fds([str(script)], {})


async def test_bad_arguments_start_nothing(listener: socket.socket) -> None:
    with pytest.raises(TypeError, match="pass_fds"):
        await spawn_with_fds(["true"], {"web": listener}, pass_fds=[listener.fileno()])
    with pytest.raises(ValueError, match="':'"):
        await spawn_with_fds(["true"], {"a:b": listener})
    with pytest.raises(ValueError, match="no fd under 'web'"):
        await spawn_with_fds(["true"], {"web": []})
    with pytest.raises(ValueError, match="argv is empty"):
        await spawn_with_fds([], {})
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(InvalidFdError, match=f"fd {r} named 'gone' is not open"):
        await spawn_with_fds(["true"], {"gone": r})


async def test_a_wrapper_that_dies_before_taking_its_fds(
    listener: socket.socket, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    broken = tmp_path / "wrapper.py"
    broken.write_text("import sys\nsys.exit(5)\n")
    monkeypatch.setattr(_spawn, "_WRAPPER", broken)
    with pytest.raises(SpawnError, match="exited with status 5 before it took its fds"):
        await spawn_with_fds(["true"], {"web": listener})


async def test_without_abstract_sockets_a_private_directory_is_used(
    checker: Path, listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_spawn, "_ABSTRACT", False)
    port = listener.getsockname()[1]
    proc = await spawn_with_fds([str(checker), "web"], {"web": listener})
    assert await ask(port) == f"ok pid={proc.pid} fds=1\n"
    assert await within(proc.wait(), WAIT) == 0


async def test_no_fd_is_made_inheritable_while_another_thread_forks(
    checker: Path, listener: socket.socket
) -> None:
    """Another thread forks and execs without closing inheritable fds the whole time: if the
    parent made the named fds (or copies) inheritable, even briefly, its children see them."""
    port = listener.getsockname()[1]
    target = f"socket:[{os.fstat(listener.fileno()).st_ino}]"
    seen: list[str] = []
    stop = threading.Event()

    def fork_without_closing() -> None:
        while not stop.is_set():
            out = subprocess.run(
                ["/bin/sh", "-c", "ls -l /proc/$$/fd"],
                close_fds=False,
                capture_output=True,
                text=True,
                check=False,
            ).stdout
            seen.extend(line for line in out.splitlines() if target in line)

    thread = threading.Thread(target=fork_without_closing)
    thread.start()
    try:
        # uvloop's own pass_fds= leaks into such children a few times in 30 spawns here.
        for _ in range(8):
            proc = await spawn_with_fds([str(checker), "web"], {"web": listener})
            assert await ask(port) == f"ok pid={proc.pid} fds=1\n"
            assert await within(proc.wait(), WAIT) == 0
    finally:
        stop.set()
        await asyncio.get_running_loop().run_in_executor(None, thread.join)
    assert seen == []
