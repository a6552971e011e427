"""``_kernel/_unix``: listening sockets, their file's mode, checking a caller's socket."""

from __future__ import annotations

import fcntl
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from aioancillary import root_or_same_user, same_user
from aioancillary._kernel import _unix
from aioancillary._kernel._authorize import CLIENT_DEFAULT, SERVER_DEFAULT
from aioancillary._kernel._unix import listen, policy_for, set_socket_mode


@pytest.fixture
def bound(tmp_path: Path) -> Iterator[tuple[socket.socket, Path]]:
    """A socket bound (not listening) to a path under a private directory."""
    path = tmp_path / "s.sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    yield sock, path
    sock.close()


@pytest.fixture(params=["SIOCUNIXFILE", "O_NOFOLLOW"])
def opened(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways of opening the bound file: the exact inode, and the path without following."""
    if request.param == "O_NOFOLLOW":
        monkeypatch.setattr(_unix, "_bound_file", lambda sock: -1)
    return str(request.param)


@pytest.mark.parametrize("mode", [0o600, 0o660, 0o666, 0o400])
def test_set_socket_mode(bound: tuple[socket.socket, Path], opened: str, mode: int) -> None:
    sock, path = bound
    set_socket_mode(sock, str(path), mode)
    assert stat.S_IMODE(path.lstat().st_mode) == mode


def test_the_mode_of_a_symlink_in_place_of_the_socket_is_never_set(
    bound: tuple[socket.socket, Path], opened: str, tmp_path: Path
) -> None:
    sock, path = bound
    target = tmp_path / "target"
    target.write_bytes(b"")
    target.chmod(0o600)
    path.unlink()
    path.symlink_to(target)
    with pytest.raises(FileExistsError, match="replaced"):
        set_socket_mode(sock, str(path), 0o666)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_a_hard_link_in_place_of_the_socket_is_refused(
    bound: tuple[socket.socket, Path], opened: str, tmp_path: Path
) -> None:
    """Another socket file of this user, linked in: several links, so not the one just made."""
    sock, path = bound
    other = socket.socket(socket.AF_UNIX)
    with other:
        other_path = tmp_path / "other.sock"
        other.bind(str(other_path))
        other_path.chmod(0o600)
        path.unlink()
        os.link(other_path, path)
        with pytest.raises(FileExistsError, match="replaced"):
            set_socket_mode(sock, str(path), 0o666)
        assert stat.S_IMODE(other_path.lstat().st_mode) == 0o600


def test_the_bound_file_handle_is_close_on_exec(bound: tuple[socket.socket, Path]) -> None:
    sock, path = bound
    fd = _unix._bound_file(sock)
    if fd < 0:
        pytest.skip("SIOCUNIXFILE needs CAP_NET_ADMIN (and Linux 4.19+)")
    try:
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert os.fstat(fd).st_ino == path.lstat().st_ino
    finally:
        os.close(fd)


def test_listen_sets_the_mode_before_anyone_can_connect(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    old = os.umask(0)  # bind() alone would make the file 0o777
    try:
        with listen(str(path), socket.SOCK_STREAM, 0o600, 8):
            assert stat.S_IMODE(path.lstat().st_mode) == 0o600
            assert os.umask(0) == 0  # never changed
    finally:
        os.umask(old)


def test_the_default_policy_applies_only_where_no_file_permission_protects() -> None:
    left, right = socket.socketpair()
    with left, right:
        for default in (SERVER_DEFAULT, CLIENT_DEFAULT):
            assert policy_for(default, "/run/x.sock", None) is None  # the file's mode decides
            assert policy_for(default, b"\0abstract", None) is default.policy
            assert policy_for(default, "\0abstract", None) is default.policy
            assert policy_for(default, None, left) is default.policy  # a sock= handed in
        assert policy_for(None, b"\0abstract", left) is None  # asked for: anyone
        assert policy_for(same_user, "/run/x.sock", None) is same_user  # given: always applied
    assert SERVER_DEFAULT.policy is same_user
    assert CLIENT_DEFAULT.policy is root_or_same_user
    assert repr(SERVER_DEFAULT) == "<same_user where no file permission protects the socket>"
