"""A worker trusts only an acceptor of its own user unless told otherwise (issue 15, item 10).

The acceptor decides what a worker serves: every fd it sends becomes a client socket in the
worker, with whatever address it claims. Here the "acceptor" is a squatter: a forked child
that drops to ``nobody`` (the tests run as root), binds the address the worker will connect
to (an abstract name, which has no permissions, or a path in a world-writable directory) and
plays the hand-off protocol: a welcome, a listener, and one client, a real TCP connection
with a made-up address. By default the worker refuses it before reading anything, and the
client socket the squatter pushed is freed by the kernel unread (its TCP peer sees the end
of the connection). Widened with ``authorize=``, the same worker takes the client, made-up
address and all: what the default protects against.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import socket
import tempfile
import traceback
import uuid
from collections.abc import Iterator

import pytest
from helpers import wait_until, within

from aioancillary import PeerRejectedError, Worker, allow_uids, send_fds
from aioancillary._core._framing import frame_header
from aioancillary._handoff import _wire as wire

NOBODY = pwd.getpwnam("nobody")
FAKE_PEER = ("203.0.113.7", 4444)  # TEST-NET-3: no client ever had this address

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="a squatter as nobody needs root")


def _framed(sock: socket.socket, data: bytes, fds: list[socket.socket] | None = None) -> None:
    fds = fds or []
    send_fds(sock, frame_header(len(fds), len(data)) + data, fds)


def _squat(address: str | bytes, ready_w: int, report_w: int) -> None:
    """The forked child: become nobody, listen on ``address``, feed the first peer a client.

    Reports what the client's TCP peer saw in the end: ``freed`` (the connection ended: no
    copy of the socket handed over was left, the worker never installed it), or the bytes
    the worker wrote to it. Everything that may import (name lookups load codecs) is done
    before dropping to nobody, who cannot read this interpreter's files.
    """
    with socket.create_server(("127.0.0.1", 0)) as tcp:
        peer = socket.create_connection(tcp.getsockname())
        client, _ = tcp.accept()
        record = wire.record_packer(0, socket.AF_INET)(FAKE_PEER)
        messages = [
            (wire.welcome_message(), []),
            (wire.listener_message(0, tcp, "web", {}), []),
            (wire.client_message([record]), [client]),
        ]
    os.setgroups([])
    os.setgid(NOBODY.pw_gid)
    os.setuid(NOBODY.pw_uid)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server, peer:
        server.bind(address)
        server.listen()
        os.write(ready_w, b"listening")
        link, _ = server.accept()
        with link:
            try:
                for data, fds in messages:
                    _framed(link, data, fds)
            except OSError:
                pass  # the worker hung up first: nothing more was delivered
            client.close()  # from here the worker's copy, if it took one, is the only one
            peer.settimeout(15)
            try:
                seen = peer.recv(100)
            except ConnectionResetError:
                seen = b""
            os.write(report_w, seen or b"freed")


@contextlib.contextmanager
def squatter(address: str | bytes) -> Iterator[list[bytes]]:
    """Fork the squatter; yield a list that holds its report once it exited."""
    ready_r, ready_w = os.pipe()
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the test
        status = 0
        try:
            os.close(ready_r)
            os.close(report_r)
            _squat(address, ready_w, report_w)
        except BaseException:
            traceback.print_exc()  # shown with the test's failure (fd 2 is captured)
            status = 1
        finally:
            os._exit(status)
    os.close(ready_w)
    os.close(report_w)
    report: list[bytes] = []
    try:
        assert os.read(ready_r, 100) == b"listening", "the squatter failed to start"
        yield report
        report.append(os.read(report_r, 100))  # returns once the child wrote or exited
    finally:
        os.close(ready_r)
        os.close(report_r)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the squatter failed"


@contextlib.contextmanager
def world_writable_dir() -> Iterator[str]:
    """A directory like /tmp (mode 1777), where any user can bind a socket first."""
    path = tempfile.mkdtemp(prefix="aioancillary-squat-")
    os.chmod(path, 0o1777)
    try:
        yield path
    finally:
        for name in os.listdir(path):
            os.unlink(os.path.join(path, name))
        os.rmdir(path)


@pytest.mark.parametrize("where", ["abstract", "path"])
async def test_the_worker_refuses_an_acceptor_of_another_user_by_default(where: str) -> None:
    with contextlib.ExitStack() as stack:
        if where == "abstract":
            address = f"\0aioancillary-squat-{uuid.uuid4().hex}"
        else:
            address = os.path.join(stack.enter_context(world_writable_dir()), "workers.sock")
        report = stack.enter_context(squatter(address))
        with pytest.raises(PeerRejectedError) as caught:
            await within(Worker.connect(address), 15)
        message = str(caught.value)
        assert f"uid {NOBODY.pw_uid}" in message
        assert "authorize=same_user" in message
        assert "before any fd was taken" in message
    assert report == [b"freed"]  # the pushed client was never installed in this process


async def test_a_wider_authorize_takes_what_that_acceptor_sends() -> None:
    address = f"\0aioancillary-squat-{uuid.uuid4().hex}"
    with squatter(address) as report:
        worker = await within(Worker.connect(address, authorize=allow_uids(NOBODY.pw_uid)), 15)
        async with worker:
            client = await within(worker.__anext__(), 15)
            with client:
                assert client.peername == FAKE_PEER  # whatever the acceptor claims
                assert client.listener == "web"
                await asyncio.get_running_loop().sock_sendall(client.sock, b"served")
    assert report == [b"served"]


async def test_authorize_none_is_refused_with_what_to_pass_instead() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs, pytest.raises(TypeError, match="same_user"):
        await Worker.connect(sock=theirs, authorize=None)  # type: ignore[arg-type]


async def test_the_default_trusts_an_acceptor_of_this_user() -> None:
    ours, theirs = socket.socketpair()  # a socketpair's peer credentials are this process's
    with ours:
        _framed(ours, wire.welcome_message())
        worker = await Worker.connect(sock=theirs)
        await wait_until(lambda: worker._welcomed)
        worker.close()
        await within(worker.wait_closed())
