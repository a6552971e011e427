"""The exec wrapper of spawn_with_fds, in this process and in forked children (spawn_with_fds
runs it with ``-I -S``, where nothing measures it): receiving many fds, refusing a stranger's
socket, placing the fds at 3, 4, ... with nothing else open, and reporting a failed exec."""

from __future__ import annotations

import array
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import FORKS_THE_TEST_PROCESS, nofile_at_least

from aioancillary._lifecycle import _exec_wrapper as wrapper


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        yield a, b


def send(sock: socket.socket, fds: list[int]) -> None:
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
    sock.sendmsg([b"F"], rights if fds else [])


def test_it_receives_more_fds_than_one_message_carries(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    parent, child = pair
    with nofile_at_least(2048):
        r, w = os.pipe()
        try:
            for start in range(0, 300, 253):
                send(parent, [r] * min(253, 300 - start))
            got = wrapper.receive(child, 300)
            try:
                assert len(got) == 300
                assert all(not os.get_inheritable(fd) for fd in got)
                assert {os.fstat(fd).st_ino for fd in got} == {os.fstat(r).st_ino}
            finally:
                for fd in got:
                    os.close(fd)
        finally:
            os.close(r)
            os.close(w)


def test_a_parent_that_goes_away_early_is_an_error(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    parent, child = pair
    r, w = os.pipe()
    try:
        send(parent, [r])
        parent.shutdown(socket.SHUT_WR)
        with pytest.raises(OSError, match="went away after 1 of 2 fds"):
            wrapper.receive(child, 2)
    finally:
        os.close(r)
        os.close(w)
    # The fd that did arrive was closed with the error (the suite's fd check says so).


def test_a_socket_that_is_not_the_parent_s_is_refused(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    reason = wrapper.check_parent(pair[1])  # its peer is this process, not our parent
    assert reason is not None
    assert f"belongs to pid {os.getpid()}, not to the parent {os.getppid()}" in reason


def test_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert wrapper.main(["@x"]) == 127
    assert "usage: _exec_wrapper.py ADDRESS COUNT PROGRAM" in capsys.readouterr().err
    assert wrapper.main(["@aioancillary-test-nobody-listens-here", "1", "true"]) == 127
    assert "cannot get the fds from the parent" in capsys.readouterr().err


@FORKS_THE_TEST_PROCESS
def test_in_a_child_it_places_the_fds_and_reports_a_failed_exec() -> None:
    name = f"aioancillary-test-wrapper-{os.getpid()}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    try:
        listener.bind("\0" + name)
        listener.listen(1)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child: the wrapper, then wait to be inspected
            status = wrapper.main([f"@{name}", "2", "/no/such/program"])
            os.read(3, 1)  # fd 3 is now the pipe's read end: the parent says when to go
            os._exit(0 if status == 127 else 1)
        conn, _ = listener.accept()
        with conn:
            send(conn, [r, w])
            failure = conn.recv(200).decode()
            assert failure.startswith("E2 ")  # ENOENT, with its reason
            # What the program would have inherited: 0-2, the pipe at 3 and 4 (inheritable),
            # and the wrapper's control socket (close-on-exec: gone at a successful exec).
            opened = sorted(int(fd) for fd in os.listdir(f"/proc/{pid}/fd"))
            assert opened[:5] == [0, 1, 2, 3, 4]
            assert len(opened) == 6
            ino_r, ino_w = os.fstat(r).st_ino, os.fstat(w).st_ino
            assert os.readlink(f"/proc/{pid}/fd/3") == f"pipe:[{ino_r}]"
            assert os.readlink(f"/proc/{pid}/fd/4") == f"pipe:[{ino_w}]"
            assert os.readlink(f"/proc/{pid}/fd/{opened[5]}").startswith("socket:")
            for fd, cloexec in ((3, False), (4, False), (opened[5], True)):
                info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
                flags = info.split("flags:")[1].split()[0]
                assert bool(int(flags, 8) & 0o2000000) is cloexec, fd  # O_CLOEXEC
        os.write(w, b"x")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        listener.close()
        os.close(r)
        os.close(w)
