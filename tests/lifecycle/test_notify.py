"""sd_notify: notify() and notify_async() against a supervisor socket run by the test.

The supervisor is a bound AF_UNIX SOCK_DGRAM socket, at a path or an abstract name, standing
in for systemd's notification socket: each test reads the exact datagram, checks the fds that
came with it by inode, and closes them (the fd check around every test sees any leak here;
child processes report their own counts).
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import LOOP_NAMES, TIMEOUT, fill_queue, wait_until, within

from aioancillary import AncillaryMessage, InvalidFdError, TooManyFdsError, recv_fds
from aioancillary._lifecycle import _notify
from aioancillary._lifecycle._notify import NotifyError, notify, notify_async, watchdog_interval

APPS = Path(__file__).resolve().parents[1] / "helpers" / "lifecycle_apps"


class Supervisor:
    """The service manager's end: a datagram socket and the NOTIFY_SOCKET value naming it."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value

    def receive(self) -> AncillaryMessage:
        """The next datagram with its fds (owned: close the message)."""
        self.sock.settimeout(TIMEOUT)
        return recv_fds(self.sock, 65536, 16)

    def assert_empty(self) -> None:
        self.sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            self.sock.recv(1)


def _bind(kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Supervisor:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if kind == "path":
        address = str(tmp_path / "notify.sock")
        sock.bind(address)
        value = address
    else:
        name = f"aioancillary-test-{os.getpid()}-{time.monotonic_ns()}"
        sock.bind("\0" + name)
        value = "@" + name
    monkeypatch.setenv("NOTIFY_SOCKET", value)
    return Supervisor(sock, value)


@pytest.fixture(params=["path", "abstract"])
def supervisor(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Supervisor]:
    """The manager's socket at a path or an abstract name."""
    supervisor = _bind(request.param, tmp_path, monkeypatch)
    with supervisor.sock:
        yield supervisor


@pytest.fixture
def fd_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Supervisor]:
    """The manager's socket at a path, the only kind fds are sent to (test_notify_receiver)."""
    supervisor = _bind("path", tmp_path, monkeypatch)
    with supervisor.sock:
        yield supervisor


# -- the datagram ---------------------------------------------------------------------------


def test_ready_and_status_exact_bytes(supervisor: Supervisor) -> None:
    assert notify(ready=True, status="serving 3 clients") is True
    with supervisor.receive() as msg:
        assert msg.data == b"READY=1\nSTATUS=serving 3 clients"
        assert msg.fds == ()


def test_every_field_in_documented_order(supervisor: Supervisor) -> None:
    notify(
        extra={"ERRNO": 2, "EXTEND_TIMEOUT_USEC": "5000000"},
        mainpid=4242,
        watchdog=True,
        status="bye",
        stopping=True,
        ready=True,
    )
    with supervisor.receive() as msg:
        assert msg.data == (
            b"READY=1\nSTOPPING=1\nSTATUS=bye\nWATCHDOG=1\nMAINPID=4242\n"
            b"ERRNO=2\nEXTEND_TIMEOUT_USEC=5000000"
        )


def test_reloading_carries_the_monotonic_clock(supervisor: Supervisor) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notify(reloading=True)
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    with supervisor.receive() as msg:
        first, second = msg.data.split(b"\n")
    assert first == b"RELOADING=1"
    key, value = second.split(b"=")
    assert key == b"MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_fdstore_sends_the_same_open_files(fd_store: Supervisor) -> None:
    supervisor = fd_store
    listener = socket.create_server(("127.0.0.1", 0))
    memfd = os.memfd_create("state")
    os.write(memfd, b"counter=7")
    sent = [listener.fileno(), memfd]
    inodes = [os.fstat(fd).st_ino for fd in sent]
    try:
        assert notify(fdstore=[listener, memfd], fdname="state", fdpoll=False) is True
        # Borrowed: the sender's fds are still open and unchanged.
        assert [os.fstat(fd).st_ino for fd in sent] == inodes
    finally:
        listener.close()
        os.close(memfd)
    with supervisor.receive() as msg:
        assert msg.data == b"FDSTORE=1\nFDNAME=state\nFDPOLL=0"
        received = [fd.fileno() for fd in msg.fds]
        assert [os.fstat(fd).st_ino for fd in received] == inodes
        assert os.pread(received[1], 16, 0) == b"counter=7"
    for fd in received:  # closed by leaving the message's with block
        with pytest.raises(OSError, match="Bad file descriptor"):
            os.fstat(fd)


def test_fdstore_remove(supervisor: Supervisor) -> None:
    notify(fdstore_remove=True, fdname="state")
    with supervisor.receive() as msg:
        assert msg.data == b"FDSTOREREMOVE=1\nFDNAME=state"


def test_several_fds_under_systemds_default_name(fd_store: Supervisor) -> None:
    supervisor = fd_store
    r, w = os.pipe()
    try:
        notify(fdstore=[r, w])
    finally:
        os.close(r)
        os.close(w)
    with supervisor.receive() as msg:
        assert msg.data == b"FDSTORE=1"  # no FDNAME: systemd names them "stored"
        assert len(msg.fds) == 2


# -- bad input: refused before anything is sent, under a manager or not ---------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fdstore": [0], "fdname": "a:b"}, "without ':'"),
        ({"fdstore": [0], "fdname": "x" * 256}, "at most 255"),
        ({"fdstore": [0], "fdname": "new\nline"}, "printable ASCII"),
        ({"status": "two\nlines"}, "newline"),
        ({"fdname": "state"}, "names fds to store"),
        ({"fdstore_remove": True}, "needs fdname="),
        ({"fdstore_remove": True, "fdname": "x", "fdstore": [0]}, "no fdstore="),
        ({"fdpoll": False, "ready": True}, "fdpoll=False applies"),
        ({"mainpid": 0}, "positive pid"),
        ({"extra": {"lower": 1}}, "upper-case"),
        ({"extra": {"ERRNO": "1\nREADY=1"}}, "newline"),
        ({}, "nothing to notify"),
    ],
)
@pytest.mark.parametrize("under_manager", [True, False])
def test_bad_arguments_are_refused(
    kwargs: dict[str, Any],
    match: str,
    under_manager: bool,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if under_manager:
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "absent.sock"))
    else:
        monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    with pytest.raises(ValueError, match=match):
        notify(**kwargs)


def test_closed_fd_is_refused_and_nothing_is_sent(supervisor: Supervisor) -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(InvalidFdError):
        notify(fdstore=[r], fdname="gone")
    supervisor.assert_empty()


def test_more_than_scm_max_fd_is_refused(supervisor: Supervisor) -> None:
    with pytest.raises(TooManyFdsError, match="at most 253"):
        notify(fdstore=[0] * 254)
    supervisor.assert_empty()


# -- no manager, or an unreachable one ------------------------------------------------------


async def test_no_notify_socket_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify(ready=True) is False
    assert await notify_async(ready=True, fdstore=[0], fdname="x") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert notify(stopping=True) is False


def _stale_path(tmp_path: Path) -> str:
    path = str(tmp_path / "stale.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as gone:
        gone.bind(path)  # the file stays, nobody listens
    return path


@pytest.mark.parametrize(
    ("value", "code"),
    [
        ("{tmp}/missing.sock", errno.ENOENT),
        ("stale", errno.ECONNREFUSED),
        ("@aioancillary-nobody-listens-here", errno.ECONNREFUSED),
    ],
)
async def test_unreachable_notify_socket_is_a_clear_error(
    value: str, code: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    value = _stale_path(tmp_path) if value == "stale" else value.format(tmp=tmp_path)
    monkeypatch.setenv("NOTIFY_SOCKET", value)
    with pytest.raises(NotifyError) as blocking:
        notify(ready=True)
    with pytest.raises(NotifyError) as not_blocking:
        await notify_async(ready=True)
    for info in (blocking, not_blocking):
        assert info.value.errno == code
        assert f"NOTIFY_SOCKET='{value}' is unreachable" in str(info.value)
        assert "unset NOTIFY_SOCKET when not running under systemd" in str(info.value)


@pytest.mark.parametrize("value", ["relative/notify.sock", "vsock:2:1234", "@"])
def test_malformed_notify_socket(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", value)
    with pytest.raises(NotifyError, match="neither an absolute path nor an @abstract name"):
        notify(ready=True)


async def test_too_long_abstract_notify_socket_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    address = "@" + "a" * 120
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    with pytest.raises(NotifyError) as blocking:
        notify(ready=True)
    with pytest.raises(NotifyError) as not_blocking:
        await notify_async(ready=True)
    for info in (blocking, not_blocking):
        assert info.value.errno == errno.ENAMETOOLONG
        assert f"is 121 bytes long: an AF_UNIX address holds at most {108}" in str(info.value)
        assert "None" not in str(info.value)


async def test_a_path_beyond_sun_path_is_reached(tmp_path: Path) -> None:
    """The path is connected to through its pinned file: over 108 bytes works too."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    path = str(deep / "notify.sock")
    assert len(os.fsencode(path)) > 108
    dirfd = os.open(deep, os.O_PATH | os.O_DIRECTORY)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
            manager.bind(f"/proc/self/fd/{dirfd}/notify.sock")  # bind() has the same limit
            env = {"NOTIFY_SOCKET": path}
            memfd = os.memfd_create("state")
            try:
                assert await within(notify_async(fdstore=[memfd], environ=env)) is True
                assert notify(ready=True, environ=env) is True
            finally:
                os.close(memfd)
            supervisor = Supervisor(manager, path)
            with supervisor.receive() as msg:
                assert (msg.data, len(msg.fds)) == (b"FDSTORE=1", 1)
            with supervisor.receive() as msg:
                assert msg.data == b"READY=1"
    finally:
        os.close(dirfd)


# -- other people's exceptions pass through unchanged -----------------------------------------


@pytest.mark.parametrize(
    "raised", [TimeoutError(), OSError(errno.EIO, "raised by the caller's handler")]
)
def test_a_signal_handlers_exception_passes_through(
    raised: OSError, supervisor: Supervisor
) -> None:
    """A caller bounds the blocking wait for room with SIGALRM: its exception is its own."""
    address = supervisor.env_value
    queued = fill_queue("\0" + address[1:] if address.startswith("@") else address)

    def on_alarm(signum: int, frame: object) -> None:
        raise raised

    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        # Wherever the alarm lands (the send waits for room until it does), it is not an
        # error of the notification socket.
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(type(raised)) as info:
            notify(ready=True)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert info.value is raised
    for _ in range(queued):
        supervisor.sock.recv(16)
    supervisor.assert_empty()  # nothing was sent


async def test_an_exception_from_inside_the_send_passes_through(
    supervisor: Supervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    raised = TimeoutError()

    def interrupted(*args: object) -> int:
        raise raised

    monkeypatch.setattr("aioancillary._lifecycle._notify.send_fds", interrupted)
    with pytest.raises(TimeoutError) as blocking:
        notify(ready=True)
    with pytest.raises(TimeoutError) as not_blocking:
        await notify_async(ready=True)
    assert blocking.value is raised
    assert not_blocking.value is raised


# -- async ------------------------------------------------------------------------------------


async def test_async_sends_the_same_datagram_and_fds(fd_store: Supervisor) -> None:
    supervisor = fd_store
    memfd = os.memfd_create("state")
    inode = os.fstat(memfd).st_ino
    try:
        assert await within(notify_async(status="up", fdstore=[memfd], fdname="db")) is True
    finally:
        os.close(memfd)
    with supervisor.receive() as msg:
        assert msg.data == b"STATUS=up\nFDSTORE=1\nFDNAME=db"
        assert [os.fstat(fd.fileno()).st_ino for fd in msg.fds] == [inode]


async def test_async_waits_for_room_without_blocking_the_loop(supervisor: Supervisor) -> None:
    address = supervisor.env_value
    address = "\0" + address[1:] if address.startswith("@") else address
    queued = fill_queue(address)
    assert queued > 0
    task = asyncio.ensure_future(notify_async(ready=True))
    for _ in range(20):
        await asyncio.sleep(0)  # the loop runs other work while the datagram waits
    assert not task.done()
    loop = asyncio.get_running_loop()
    supervisor.sock.setblocking(False)
    for _ in range(queued):
        assert await within(loop.sock_recv(supervisor.sock, 16)) == b"x"
    assert await within(task) is True
    assert await within(loop.sock_recv(supervisor.sock, 16)) == b"READY=1"


async def test_async_cancelled_while_waiting_sends_nothing(supervisor: Supervisor) -> None:
    address = supervisor.env_value
    address = "\0" + address[1:] if address.startswith("@") else address
    queued = fill_queue(address)
    task = asyncio.ensure_future(notify_async(stopping=True))
    for _ in range(5):
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(queued):
        supervisor.sock.recv(16)
    supervisor.assert_empty()


async def test_async_wait_ends_once_when_the_manager_goes_away(
    fd_store: Supervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A persistent error while waiting for room ends the wait: one error, no retry loop."""
    sends: list[int] = []
    send = _notify._send

    def counting(*args: Any) -> None:
        sends.append(1)
        send(*args)

    monkeypatch.setattr(_notify, "_send", counting)
    queued = fill_queue(fd_store.env_value)
    assert queued > 0
    task = asyncio.ensure_future(notify_async(ready=True))
    await wait_until(lambda: len(sends) == 1)  # tried once, now waits for room
    for _ in range(5):
        await asyncio.sleep(0)
    assert not task.done()
    fd_store.sock.close()  # the manager is gone: its socket is writable now, and refuses
    with pytest.raises(NotifyError, match=r"failed \(Connection refused\)") as info:
        await within(task)
    assert info.value.errno == errno.ECONNREFUSED
    assert len(sends) == 2  # the wake-up's one try, and no more


# -- across processes -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["blocking", *LOOP_NAMES])
def test_child_parks_its_state_and_leaks_nothing(mode: str, fd_store: Supervisor) -> None:
    supervisor = fd_store
    env = {**os.environ, "NOTIFY_SOCKET": supervisor.env_value}
    proc = subprocess.run(
        [sys.executable, str(APPS / "notifier.py"), mode],
        capture_output=True,
        text=True,
        env=env,
        timeout=TIMEOUT * 2,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["sent"] is True
    assert report["after"] == report["before"]  # the child closed its socket and memfd
    with supervisor.receive() as msg:
        assert msg.data == b"READY=1\nFDSTORE=1\nFDNAME=state"
        (fd,) = msg.fds
        assert os.fstat(fd.fileno()).st_ino == report["inode"]
        assert os.pread(fd.fileno(), 64, 0).startswith(b"state of pid ")


# -- watchdog -------------------------------------------------------------------------------


def test_watchdog_interval() -> None:
    assert watchdog_interval(environ={}) is None
    assert watchdog_interval(environ={"WATCHDOG_USEC": "2500000"}) == 2.5
    mine = {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval(environ=mine) == 30.0
    other = {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert watchdog_interval(environ=other) is None  # another process's watchdog
    env = dict(mine)
    assert watchdog_interval(environ=env, unset_environment=True) == 30.0
    assert env == {}


@pytest.mark.parametrize("value", ["0", "-5", "1.5", "soon", ""])
def test_watchdog_malformed(value: str) -> None:
    env = {"WATCHDOG_USEC": value}
    with pytest.raises(ValueError, match=r"WATCHDOG_USEC=.*not a positive integer"):
        watchdog_interval(environ=env, unset_environment=True)
    assert env == {}  # unset on errors too
