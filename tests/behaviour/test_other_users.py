"""Another local user as the attacker: a process running as ``nobody`` (started by root).

Issue 15, item 9: the socket file's mode is set without following a link another user swapped
in, and without changing the process umask while binding. Item 10: where no file permission
protects a socket (an abstract name, a ``sock=`` whose mode someone else chose), servers let
in only this user and clients talk only to this user or root, unless told otherwise.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import stat
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import RecordingProtocol, close_all, wait_until, within
from helpers.other_user import OtherUser, needs_root

from aioancillary import (
    AncillaryConnection,
    AncillaryProtocol,
    AncillaryServer,
    AncillaryTransport,
    PeerRejectedError,
    create_unix_connection,
    create_unix_server,
    frame_header,
    open_unix_connection,
    start_unix_server,
)
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


# -- who may connect where no file permission protects the socket -------------------------------


def _abstract() -> bytes:
    return b"\0aioancillary-test-" + uuid.uuid4().hex.encode()


async def _greet(conn: AncillaryConnection) -> None:
    await conn.send(b"hello")


class _Greet(AncillaryProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, AncillaryTransport)
        transport.write(b"hello")


async def _serve(kind: str, where: Any, **kwargs: Any) -> AncillaryServer:
    if kind == "start_unix_server":
        return await start_unix_server(_greet, **where, **kwargs)
    return await create_unix_server(_Greet, **where, **kwargs)


async def _answer(attacker: OtherUser, address: str | bytes) -> Any:
    """What the other user gets when it connects: the greeting's bytes (hex), or ``"eof"``."""
    raw = address.encode() if isinstance(address, str) else address
    assert await attacker.aask("connect", raw) == "connected"
    return await attacker.aask("recv")


GREETING = (frame_header(0, 5) + b"hello").hex()


@needs_root
@pytest.mark.parametrize("kind", ["start_unix_server", "create_unix_server"])
@pytest.mark.parametrize("where", ["abstract", "sock"])
async def test_unprotected_servers_let_in_only_this_user_by_default(
    shared_dir: Path, kind: str, where: str
) -> None:
    inherited = None
    if where == "abstract":
        address: str | bytes = _abstract()
        listen_on: dict[str, Any] = {"path": address}
    else:  # a listening socket whose file mode its creator chose: anyone may connect
        address = str(shared_dir / "inherited.sock")
        inherited = socket.socket(socket.AF_UNIX)
        inherited.bind(address)
        os.chmod(address, 0o777)
        inherited.listen()
        listen_on = {"sock": inherited}
    with OtherUser() as attacker:
        async with await _serve(kind, listen_on) as server:
            assert await _answer(attacker, address) == "eof"
            await wait_until(lambda: server.stats.rejected == 1)
            assert server.stats.accepted == 1
            async with await open_unix_connection(address) as conn:  # this user: served
                with await within(conn.recv()) as msg:
                    assert msg.data == b"hello"


@needs_root
@pytest.mark.parametrize("kind", ["start_unix_server", "create_unix_server"])
async def test_authorize_none_lets_anyone_in_when_asked(kind: str) -> None:
    address = _abstract()
    with OtherUser() as attacker:
        async with await _serve(kind, {"path": address}, authorize=None) as server:
            assert await _answer(attacker, address) == GREETING
            assert server.stats.rejected == 0


@needs_root
async def test_a_socket_file_is_guarded_by_its_mode_alone(shared_dir: Path) -> None:
    """On a path the file's permissions decide: a mode that admits everyone admits the other
    user, with no check of its credentials by default."""
    path = shared_dir / "open.sock"
    with OtherUser() as attacker:
        async with await start_unix_server(_greet, path, mode=0o666) as server:
            assert await _answer(attacker, str(path)) == GREETING
            assert server.stats.rejected == 0


@needs_root
@pytest.mark.parametrize("kind", ["open_unix_connection", "create_unix_connection"])
async def test_a_client_refuses_a_squatter_on_an_abstract_name(kind: str) -> None:
    """Another user bound the abstract name first: by default the client refuses it before
    anything is sent; ``authorize=None`` talks to it anyway."""
    address = _abstract()
    with OtherUser() as squatter:
        assert await squatter.aask("listen", address) == "listening"
        if kind == "open_unix_connection":
            with pytest.raises(PeerRejectedError):
                await within(open_unix_connection(address))
            conn = await within(open_unix_connection(address, authorize=None))
            await conn.send(b"to whoever is there")
            assert await squatter.aask("accept") == "accepted"  # the refused connection: closed
            assert await squatter.aask("recv") == "eof"
            assert await squatter.aask("accept") == "accepted"
            assert (
                await squatter.aask("recv") == (frame_header(0, 19) + b"to whoever is there").hex()
            )
            await close_all(conn)
        else:
            with pytest.raises(PeerRejectedError):
                await within(create_unix_connection(RecordingProtocol, address))
            transport, protocol = await within(
                create_unix_connection(RecordingProtocol, address, authorize=None)
            )
            transport.close()
            await within(protocol.lost)
