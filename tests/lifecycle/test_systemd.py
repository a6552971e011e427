"""systemd socket activation: listen_fds() and NamedFds.

Three layers of tests: NamedFds on fds this process opened; listen_fds() in child processes whose
fds 3, 4, ... and LISTEN_* variables are laid out by tests/helpers/lifecycle_apps/activate.py (the
error cases the real tool cannot produce); and the real /usr/bin/systemd-socket-activate
starting tests/helpers/lifecycle_apps/adopt.py, which serves on what it adopted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from helpers import TIMEOUT, is_open, within
from hypothesis import given
from hypothesis import strategies as st

from aioancillary import OwnedFd
from aioancillary._lifecycle import _systemd
from aioancillary._lifecycle._systemd import (
    ActivationError,
    FdNameError,
    FdTypeError,
    NamedFds,
    check_fdname,
    listen_fds,
)

APPS = Path(__file__).resolve().parents[1] / "helpers" / "lifecycle_apps"
ACTIVATE = shutil.which("systemd-socket-activate")
needs_activate = pytest.mark.skipif(
    ACTIVATE is None,
    reason="systemd-socket-activate is not installed (Debian: package systemd); these tests "
    "run the real tool",
)


# -- fd names -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["web", "", "a b", "x" * 255, "stored", "~!@#"])
def test_check_fdname_accepts_what_systemd_accepts(name: str) -> None:
    assert check_fdname(name) == name


@pytest.mark.parametrize(
    ("name", "why"),
    [("a:b", "':'"), ("x" * 256, "at most 255"), ("tab\there", "printable"), ("é", "ASCII")],
)
def test_check_fdname_refuses_with_the_reason(name: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        check_fdname(name)


@given(st.text(max_size=300))
def test_check_fdname_is_systemds_rule(name: str) -> None:
    valid = len(name) <= 255 and all(32 <= ord(ch) <= 126 and ch != ":" for ch in name)
    try:
        check_fdname(name)
    except ValueError:
        assert not valid
    else:
        assert valid


# -- parsing the environment (error paths only: nothing in this process is adopted) ---------


@given(pid=st.integers(min_value=1, max_value=2**22), names=st.text(max_size=40))
def test_listen_pid_of_another_process_is_refused_and_unset(pid: int, names: str) -> None:
    if pid == os.getpid():
        pid += 1
    env = {"LISTEN_PID": str(pid), "LISTEN_FDS": "2", "LISTEN_FDNAMES": names}
    with pytest.raises(ActivationError, match=rf"LISTEN_PID={pid} but this process is"):
        listen_fds(environ=env)
    assert env == {}  # unset on errors too, as sd_listen_fds(1) does


@given(text=st.text(max_size=12).filter(lambda t: not (t.isascii() and t.isdigit())))
def test_malformed_counts_are_refused(text: str) -> None:
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": text}
    with pytest.raises(ActivationError, match=r"LISTEN_FDS=.* is not a non-negative integer"):
        listen_fds(environ=env, unset_environment=False)
    assert env["LISTEN_FDS"] == text  # unset_environment=False leaves everything


@given(count=st.integers(min_value=1, max_value=9), extra=st.integers(min_value=1, max_value=3))
def test_name_count_mismatch_is_refused(count: int, extra: int) -> None:
    names = ":".join(["n"] * (count + extra))  # "a::b" counts as three names: no coalescing
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": str(count), "LISTEN_FDNAMES": names}
    with pytest.raises(ActivationError, match=rf"{count + extra} name.*LISTEN_FDS={count}"):
        listen_fds(environ=env)


def test_no_variables_means_not_activated() -> None:
    env: dict[str, str] = {"LISTEN_FDNAMES": "web"}
    fds = listen_fds(environ=env)
    assert (fds.source, len(fds), fds.names()) == ("none", 0, [])
    assert env == {}


# -- NamedFds on fds of this process --------------------------------------------------------


@pytest.fixture
def mixed() -> Any:
    """A NamedFds with a TCP listener 'web', two datagram sockets 'dgram', a pipe 'state'."""
    listener = socket.create_server(("127.0.0.1", 0))
    d1, d2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    r, w = os.pipe()
    os.close(w)
    items = [
        ("web", OwnedFd(listener.detach())),
        ("dgram", OwnedFd(d1.detach())),
        ("state", OwnedFd(r)),
        ("dgram", OwnedFd(d2.detach())),
    ]
    fds = NamedFds(items, "systemd")
    yield fds
    fds.close()


def test_names_keep_order_and_duplicates_share_one(mixed: NamedFds) -> None:
    assert mixed.names() == ["web", "dgram", "state"]
    assert len(mixed) == 4
    assert "dgram" in mixed
    assert "nope" not in mixed


def test_take_socket_detects_family_and_type(mixed: NamedFds) -> None:
    with mixed.take_socket("web", family=socket.AF_INET, type=socket.SOCK_STREAM) as sock:
        assert sock.getsockname()[0] == "127.0.0.1"
        assert (sock.family, sock.type) == (socket.AF_INET, socket.SOCK_STREAM)
    assert "web" not in mixed


def test_duplicate_names_are_taken_together(mixed: NamedFds) -> None:
    with pytest.raises(FdNameError, match=r"2 fds are named 'dgram'.*take_sockets"):
        mixed.take_socket("dgram")
    with pytest.raises(FdNameError, match="2 fds are named 'dgram'"):
        mixed.take_fd("dgram")
    assert len(mixed) == 4  # nothing taken by the refusals
    socks = mixed.take_sockets("dgram", type=socket.SOCK_DGRAM)
    try:
        socks[0].send(b"ping")
        assert socks[1].recv(10) == b"ping"  # the pair, in the order given
    finally:
        for sock in socks:
            sock.close()
    assert mixed.names() == ["web", "state"]


def test_a_pipe_is_not_a_socket(mixed: NamedFds) -> None:
    with pytest.raises(FdTypeError, match=r"named 'state' is a FIFO \(pipe\), not a socket"):
        mixed.take_socket("state")
    with mixed.take_fd("state") as fd:  # still there, and usable as an fd
        assert os.read(fd.fileno(), 10) == b""


def test_wrong_family_or_type_is_refused_and_kept(mixed: NamedFds) -> None:
    with pytest.raises(FdTypeError, match="AF_INET socket, not AF_UNIX"):
        mixed.take_socket("web", family=socket.AF_UNIX)
    with pytest.raises(FdTypeError, match="SOCK_DGRAM socket, not SOCK_STREAM"):
        mixed.take_sockets("dgram", type=socket.SOCK_STREAM)
    assert len(mixed) == 4


def test_missing_name_says_what_is_there(mixed: NamedFds) -> None:
    with pytest.raises(FdNameError, match=r"no fd named 'api' \(names held: 'web', 'dgram'"):
        mixed.take_fd("api")
    with pytest.raises(FdNameError, match="FileDescriptorName="):
        mixed.take_socket("api")


def test_create_when_absent_inherits_when_present(mixed: NamedFds) -> None:
    made: list[socket.socket] = []

    def create() -> socket.socket:
        made.append(socket.create_server(("127.0.0.1", 0)))
        return made[-1]

    with mixed.take_socket("web", create=create) as inherited:
        assert made == []
    with mixed.take_socket("api", create=create) as fresh:
        assert made == [fresh]
    assert inherited.fileno() == -1


def test_close_closes_what_nobody_took(mixed: NamedFds) -> None:
    nums = [fd.fileno() for _, fd in mixed._items]
    web = mixed.take_socket("web")
    closed = mixed.close()
    assert closed == ["dgram", "state", "dgram"]
    assert [is_open(n) for n in nums] == [True, False, False, False]
    web.close()
    assert mixed.close() == []


# -- listen_fds() in a child laid out by activate.py ------------------------------------------


def run_activated(spec: dict[str, Any], *args: str) -> dict[str, Any]:
    """Run adopt.py under activate.py with ``spec``; return its JSON report."""
    cmd = [sys.executable, str(APPS / "activate.py"), json.dumps(spec)]
    cmd += [sys.executable, str(APPS / "adopt.py"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT * 2, check=False)
    assert proc.returncode == 0, proc.stderr
    report: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    return report


def test_adopts_by_name_sets_cloexec_and_unsets_the_environment() -> None:
    report = run_activated(
        {"fds": ["tcp", "pipe", "unix-dgram", "tcp"], "names": "web:state:events:web"}, "report"
    )
    assert report["source"] == "systemd"
    assert report["names"] == ["web", "state", "events"]
    assert report["env_after"] == {"LISTEN_PID": None, "LISTEN_FDS": None, "LISTEN_FDNAMES": None}
    assert report["fds"] == [
        {"name": "web", "fd": 3, "cloexec": True, "socket": True, "family": "AF_INET",
         "type": "SOCK_STREAM"},
        {"name": "web", "fd": 6, "cloexec": True, "socket": True, "family": "AF_INET",
         "type": "SOCK_STREAM"},
        {"name": "state", "fd": 4, "cloexec": True, "socket": False},
        {"name": "events", "fd": 5, "cloexec": True, "socket": True, "family": "AF_UNIX",
         "type": "SOCK_DGRAM"},
    ]  # fmt: skip


def test_keeps_the_environment_when_asked() -> None:
    report = run_activated({"fds": ["tcp"], "names": "web"}, "report", "--keep-env")
    env = report["env_after"]
    assert (env["LISTEN_FDS"], env["LISTEN_FDNAMES"]) == ("1", "web")
    assert env["LISTEN_PID"].isdigit()


def test_without_names_every_fd_is_unknown() -> None:
    report = run_activated({"fds": ["tcp", "udp"]}, "report")
    assert [fd["name"] for fd in report["fds"]] == ["unknown", "unknown"]
    assert [fd["type"] for fd in report["fds"]] == ["SOCK_STREAM", "SOCK_DGRAM"]


def test_listen_pid_mismatch_in_child_touches_no_fd() -> None:
    report = run_activated({"fds": ["tcp"], "names": "web", "pid": "other"}, "take-socket", "web")
    assert report["error"] == "ActivationError"
    assert "the activated fds were passed to another process" in report["message"]
    assert "exec it from wrapper scripts" in report["message"]
    assert report["open_3_4"] == [True, False]  # fd 3 left alone: it was not for us


def test_non_socket_fd_is_refused_when_a_socket_is_asked_for() -> None:
    report = run_activated({"fds": ["memfd"], "names": "web"}, "take-socket", "web")
    assert report["error"] == "FdTypeError"
    assert "fd 3 named 'web' is a regular file, not a socket" in report["message"]
    assert "take_fd()" in report["message"]
    assert report["open_3_4"] == [False, False]  # closed with the NamedFds


def test_missing_name_in_child() -> None:
    report = run_activated({"fds": ["tcp", "pipe"], "names": "web:state"}, "take-socket", "api")
    assert report["error"] == "FdNameError"
    assert "no fd named 'api' (names held: 'web', 'state')" in report["message"]
    assert report["open_3_4"] == [False, False]


def test_fd_count_beyond_the_open_fds_is_refused() -> None:
    report = run_activated({"fds": ["tcp"], "names": "a:b", "count": 2}, "take-socket", "a")
    assert report["error"] == "ActivationError"
    assert "LISTEN_FDS=2 but fd 4 is not open" in report["message"]


def test_success_leaves_only_what_was_not_taken() -> None:
    report = run_activated({"fds": ["tcp", "pipe"], "names": "web:state"}, "take-socket", "web")
    assert report == {
        "family": "AF_INET",
        "type": "SOCK_STREAM",
        "left": ["state"],
        "open_3_4": [False, False],
    }


# -- the real systemd-socket-activate ---------------------------------------------------------


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port: int = probe.getsockname()[1]
    return port


def loop_name() -> str:
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.startswith("uvloop") else "asyncio"


@contextlib.asynccontextmanager
async def activated(
    listen: list[str], options: list[str], *app_args: str
) -> AsyncIterator[asyncio.subprocess.Process]:
    """``systemd-socket-activate -l ... OPTIONS python adopt.py ARGS``, once it listens."""
    assert ACTIVATE is not None
    cmd = [ACTIVATE, *(f"--listen={addr}" for addr in listen), *options]
    cmd += [sys.executable, str(APPS / "adopt.py"), *app_args]
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    assert proc.stderr is not None
    seen: list[str] = []
    try:
        # The tool reports each socket as "Listening on ADDR as FD." once it is bound.
        while sum("Listening on" in line for line in seen) < len(listen):
            line = (await within(proc.stderr.readline())).decode()
            if not line:
                raise AssertionError(f"systemd-socket-activate exited: {seen}")
            seen.append(line)
        yield proc
    finally:
        if proc.returncode is None:
            with contextlib.suppress(TimeoutError):
                await within(proc.wait(), TIMEOUT)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await proc.communicate()


async def report_of(proc: asyncio.subprocess.Process) -> dict[str, Any]:
    assert proc.stdout is not None
    out = await within(proc.stdout.read())
    assert await within(proc.wait()) == 0
    report: dict[str, Any] = json.loads(out.decode().splitlines()[-1])
    return report


async def ask_tcp(port: int, text: str) -> str:
    reader, writer = await within(asyncio.open_connection("127.0.0.1", port))
    try:
        writer.write(text.encode() + b"\n")
        return (await within(reader.readline())).decode()
    finally:
        writer.close()
        await writer.wait_closed()


def check_clean(report: dict[str, Any], adopted: int) -> None:
    assert report["env_after"] == {"LISTEN_PID": None, "LISTEN_FDS": None, "LISTEN_FDNAMES": None}
    assert report["unclaimed"] == []
    assert report["fds_after"] == report["fds_before"] - adopted  # only the adopted ones went


@needs_activate
async def test_real_activation_tcp_listener_by_name() -> None:
    port = free_port()
    async with activated(
        [f"127.0.0.1:{port}"], ["--fdname=web"], "serve", loop_name(), "web"
    ) as proc:
        # The tool execs the service on the first connection; the kernel queues it meanwhile.
        assert await ask_tcp(port, "hello") == "web:hello\n"
        report = await report_of(proc)
    assert report["kinds"] == [["web", "AF_INET", "SOCK_STREAM"]]
    assert report["loop"].startswith(loop_name())
    check_clean(report, 1)


@needs_activate
async def test_real_activation_several_names_and_a_shared_one(tmp_path: Path) -> None:
    port1, port2 = free_port(), free_port()
    path = tmp_path / "admin.sock"
    listen = [f"127.0.0.1:{port1}", str(path), f"127.0.0.1:{port2}"]
    async with activated(
        listen, ["--fdname=web:admin:web"], "serve", loop_name(), "web", "admin"
    ) as proc:
        assert await ask_tcp(port1, "one") == "web:one\n"
        assert await ask_tcp(port2, "two") == "web:two\n"
        reader, writer = await within(asyncio.open_unix_connection(path))
        writer.write(b"three\n")
        assert await within(reader.readline()) == b"admin:three\n"
        writer.close()
        await writer.wait_closed()
        report = await report_of(proc)
    assert report["kinds"] == [
        ["web", "AF_INET", "SOCK_STREAM"],
        ["web", "AF_INET", "SOCK_STREAM"],
        ["admin", "AF_UNIX", "SOCK_STREAM"],
    ]
    check_clean(report, 3)


@needs_activate
async def test_real_activation_datagram_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "dgram.sock"
    async with activated(
        [str(path)], ["--datagram", "--fdname=events"], "serve", loop_name(), "events"
    ) as proc:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as client:
            client.bind(str(tmp_path / "client.sock"))
            client.sendto(b"tick", str(path))
            loop = asyncio.get_running_loop()
            client.setblocking(False)
            assert await within(loop.sock_recv(client, 100)) == b"events:tick\n"
        report = await report_of(proc)
    assert report["kinds"] == [["events", "AF_UNIX", "SOCK_DGRAM"]]
    check_clean(report, 1)


@needs_activate
async def test_real_activation_seqpacket_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "seq.sock"
    async with activated(
        [str(path)], ["--seqpacket", "--fdname=ctl"], "serve", loop_name(), "ctl"
    ) as proc:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as client:
            client.setblocking(False)
            loop = asyncio.get_running_loop()
            await within(loop.sock_connect(client, str(path)))
            await within(loop.sock_sendall(client, b"status"))
            assert await within(loop.sock_recv(client, 100)) == b"ctl:status\n"
        report = await report_of(proc)
    assert report["kinds"] == [["ctl", "AF_UNIX", "SOCK_SEQPACKET"]]
    check_clean(report, 1)


@needs_activate
async def test_real_activation_missing_name_is_a_clear_error() -> None:
    port = free_port()
    async with activated([f"127.0.0.1:{port}"], ["--fdname=web"], "take-socket", "api") as proc:
        with socket.create_connection(("127.0.0.1", port)):  # triggers the exec
            report = await report_of(proc)
    assert report["error"] == "FdNameError"
    assert "no fd named 'api' (names held: 'web')" in report["message"]


# -- LISTEN_PIDFDID (systemd 257+): the pid may have been reused ------------------------------


def test_own_pidfd_id_names_this_process_where_the_kernel_has_pidfs() -> None:
    own = _systemd.own_pidfd_id()
    if own is None:
        pytest.skip("this kernel has no pidfs (Linux < 6.9): pidfds name no process here")
    pidfd = os.pidfd_open(os.getpid())
    try:
        assert os.fstat(pidfd).st_ino == own
    finally:
        os.close(pidfd)
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            "from aioancillary._lifecycle import _systemd; print(_systemd.own_pidfd_id())",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert int(child.stdout) not in (own, 0)


def test_listen_pidfdid_of_a_gone_process_is_refused_and_unset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_systemd, "own_pidfd_id", lambda: 4242)
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_PIDFDID": "4241", "LISTEN_FDS": "0"}
    with pytest.raises(ActivationError, match=r"LISTEN_PIDFDID=4241 but this process's .* 4242"):
        listen_fds(environ=env)
    assert env == {}


@pytest.mark.parametrize("own", [4242, None], ids=["pidfs", "no-pidfs"])
def test_listen_pidfdid_that_matches_or_cannot_be_checked_is_accepted(
    own: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_systemd, "own_pidfd_id", lambda: own)
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_PIDFDID": "4242", "LISTEN_FDS": "0"}
    with listen_fds(environ=env) as named:
        assert named.names() == []
    assert env == {}


def test_malformed_listen_pidfdid_is_refused() -> None:
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_PIDFDID": "-1", "LISTEN_FDS": "0"}
    with pytest.raises(ActivationError, match=r"LISTEN_PIDFDID='-1' is not a non-negative"):
        listen_fds(environ=env)


def test_an_anonymous_inode_pidfd_is_not_taken_for_an_id(monkeypatch: pytest.MonkeyPatch) -> None:
    # Before pidfs every pidfd is the one anonymous inode an eventfd also gets.
    monkeypatch.setattr(os, "pidfd_open", lambda pid: os.eventfd(0))
    assert _systemd.own_pidfd_id() is None
