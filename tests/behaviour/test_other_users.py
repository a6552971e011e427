"""Another local user as the attacker: a process running as ``nobody`` (started by root).

Issue 15, item 9: the socket file's mode is set without following a link another user swapped
in, and without changing the process umask while binding.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.other_user import OtherUser, needs_root

from aioancillary import AncillaryConnection, start_unix_server
from aioancillary._kernel import _unix


async def ignore(conn: AncillaryConnection) -> None:
    """A handler that never runs in these tests."""


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory any user may write (no sticky bit): another user can replace its files."""
    path = Path(tempfile.mkdtemp(prefix="aioancillary-shared-", dir="/tmp"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path)


class _AfterBind:
    """Makes ``socket.socket.bind`` run ``hook(path)`` right after binding ``path``: the
    window between creating the socket file and setting its mode, where an attacker acts."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, path: Path, hook: Any) -> None:
        target = str(path)

        class Hooked(socket.socket):
            def bind(self, address: Any) -> None:
                super().bind(address)
                if address == target:
                    hook(target)

        monkeypatch.setattr(socket, "socket", Hooked)


@needs_root
@pytest.mark.parametrize("swap", ["symlink", "socket"])
@pytest.mark.parametrize("opened", ["SIOCUNIXFILE", "O_NOFOLLOW"])
async def test_a_socket_file_swapped_after_bind_is_never_chmodded_through(
    shared_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, swap: str, opened: str
) -> None:
    """Another user replaces the new socket file, between ``bind()`` and the mode being set,
    by a link to a file of ours (or by a socket of theirs): the server refuses to listen and
    changes neither file's mode. Both ways of opening the bound file are tried: the exact
    inode (``SIOCUNIXFILE``, with ``CAP_NET_ADMIN``), and the path with ``O_NOFOLLOW``."""
    if opened == "O_NOFOLLOW":
        monkeypatch.setattr(_unix, "_bound_file", lambda sock: -1)  # as without CAP_NET_ADMIN
    secret = tmp_path / "secret"  # root's own file, which a mode=0o666 server must not open up
    secret.write_bytes(b"root only")
    secret.chmod(0o600)
    path = shared_dir / "s.sock"
    with OtherUser() as attacker:

        def attack(bound: str) -> None:
            if swap == "symlink":
                assert attacker.ask("swap_symlink", bound, str(secret)) == "ok"
            else:
                assert attacker.ask("swap_socket", bound) == "ok"

        _AfterBind(monkeypatch, path, attack)
        with pytest.raises(FileExistsError, match="replaced"):
            await start_unix_server(ignore, path, mode=0o666)
        monkeypatch.undo()
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        st = path.lstat()
        if swap == "symlink":
            assert stat.S_ISLNK(st.st_mode)
        else:
            assert stat.S_ISSOCK(st.st_mode)
            assert st.st_uid != 0  # the attacker's socket, untouched
            assert stat.S_IMODE(st.st_mode) != 0o666


@pytest.mark.parametrize("mode", [0o600, 0o666])
async def test_binding_leaves_the_process_umask_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: int
) -> None:
    """A file another thread creates while the server binds gets the process umask, not one
    narrowed (or widened) to the server's mode; the socket file still ends with ``mode``."""
    path = tmp_path / "s.sock"
    made: list[int] = []

    def other_thread_creates_a_file(bound: str) -> None:
        def create() -> None:
            fd = os.open(tmp_path / "other", os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o666)
            os.close(fd)
            made.append(stat.S_IMODE(os.stat(tmp_path / "other").st_mode))

        thread = threading.Thread(target=create)
        thread.start()
        thread.join()

    old = os.umask(0o022)
    try:
        _AfterBind(monkeypatch, path, other_thread_creates_a_file)
        server = await start_unix_server(ignore, path, mode=mode)
        monkeypatch.undo()
        async with server:
            assert stat.S_IMODE(path.stat().st_mode) == mode
    finally:
        os.umask(old)
    assert made == [0o644]
