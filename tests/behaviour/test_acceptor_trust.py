"""Only workers of the acceptor's own user register unless told otherwise (issue 15, item 10).

A registered worker gets clients: their sockets, and so their request bytes. Here an impostor,
a forked child that drops to ``nobody`` (the tests run as root), connects to the acceptor's
worker socket (an abstract name, which has no permissions, or a socket file whose mode lets
anyone connect) and plays a worker: it reads what the acceptor sends until a client fd
arrives. By default the acceptor disconnects it before sending anything; widened with
``authorize=``, the same impostor registers and receives a real client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import socket
import tempfile
import traceback
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from helpers import wait_until, within

from aioancillary import Acceptor, allow_uids, recv_fds

NOBODY = pwd.getpwnam("nobody")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="an impostor as nobody needs root")


def _impostor(address: str, report_w: int) -> None:
    """The forked child: become nobody, connect to ``address``, read until a client fd comes
    or the acceptor hangs up; report what it got as JSON."""
    os.setgroups([])
    os.setgid(NOBODY.pw_gid)
    os.setuid(NOBODY.pw_uid)
    got: dict[str, Any] = {"connected": False, "bytes": 0, "kinds": [], "client_fds": 0}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as link:
        link.settimeout(20)
        try:
            link.connect(address)
            got["connected"] = True
            stream = b""
            while not got["client_fds"]:
                with recv_fds(link, 65536, 16) as msg:
                    if not msg.data:
                        break  # the acceptor hung up
                    got["bytes"] += len(msg.data)
                    got["client_fds"] += len(msg.fds)
                    stream += msg.data
                # Frames: an 8-byte header (version, flags, fd count, length), then the
                # message, whose first byte says what it is (W, L, C).
                while len(stream) >= 8:
                    size = int.from_bytes(stream[4:8], "big")
                    if len(stream) < 8 + size:
                        break
                    got["kinds"].append(chr(stream[8]))
                    stream = stream[8 + size :]
        except OSError as exc:
            got["error"] = type(exc).__name__
    os.write(report_w, json.dumps(got).encode())


@contextlib.contextmanager
def impostor(address: str) -> Iterator[list[dict[str, Any]]]:
    """Fork the impostor; yield a list that holds its report once it exited."""
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the test, never touches the loop
        status = 0
        try:
            os.close(report_r)
            _impostor(address, report_w)
        except BaseException:
            traceback.print_exc()
            status = 1
        finally:
            os._exit(status)
    os.close(report_w)
    report: list[dict[str, Any]] = []
    try:
        yield report
    finally:
        try:
            data = os.read(report_r, 4096)  # returns once the child wrote or exited
            if data:
                report.append(json.loads(data))
        finally:
            os.close(report_r)
            _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the impostor failed"


@contextlib.contextmanager
def open_dir() -> Iterator[str]:
    """A directory any user may enter (the test's tmp_path is root's alone)."""
    path = tempfile.mkdtemp(prefix="aioancillary-workers-")
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        for name in os.listdir(path):
            os.unlink(os.path.join(path, name))
        os.rmdir(path)


@contextlib.asynccontextmanager
async def serving_acceptor(
    where: str, **kwargs: Any
) -> AsyncIterator[tuple[Acceptor, Any, str, tuple[str, int]]]:
    """An acceptor with a TCP listener and a worker socket (abstract, or a 0o666 file)."""
    with contextlib.ExitStack() as stack:
        if where == "abstract":
            address = f"\0aioancillary-workers-{uuid.uuid4().hex}"
        else:
            address = os.path.join(stack.enter_context(open_dir()), "workers.sock")
            kwargs.setdefault("mode", 0o666)  # the file's mode lets anyone connect
        acceptor = Acceptor()
        listener = socket.create_server(("127.0.0.1", 0))
        acceptor.add_listener(listener, name="web")
        try:
            server = await acceptor.listen_for_workers(address, **kwargs)
            yield acceptor, server, address, listener.getsockname()
        finally:
            acceptor.abort()
            await within(acceptor.wait_closed())


@pytest.mark.parametrize("where", ["abstract", "path"])
async def test_a_worker_of_another_user_is_refused_by_default(where: str) -> None:
    async with serving_acceptor(where) as (acceptor, server, address, web):
        # A client is waiting: whoever registers first would get it and its request.
        _reader, writer = await asyncio.open_connection(*web)
        writer.write(b"GET /secret HTTP/1.0\r\n\r\n")
        with impostor(address) as report:
            await wait_until(lambda: server.stats.rejected == 1, timeout=20)
        assert report == [{"connected": True, "bytes": 0, "kinds": [], "client_fds": 0}]
        assert acceptor.workers == ()
        stats = acceptor.stats()
        assert (stats.accepted, stats.handed) == (0, 0)  # the client still waits in the backlog
        writer.close()
        await writer.wait_closed()


@pytest.mark.parametrize("where", ["abstract", "path"])
async def test_a_wider_authorize_lets_that_worker_register_and_take_clients(where: str) -> None:
    authorize = allow_uids(NOBODY.pw_uid)
    async with serving_acceptor(where, authorize=authorize) as (acceptor, _server, address, web):
        _reader, writer = await asyncio.open_connection(*web)
        writer.write(b"GET /secret HTTP/1.0\r\n\r\n")
        with impostor(address) as report:
            await wait_until(lambda: acceptor.stats().handed == 1, timeout=20)
        assert report[0]["kinds"] == ["W", "L", "C"]
        assert report[0]["client_fds"] == 1
        await wait_until(lambda: acceptor.workers == ())  # it left with the client
        assert acceptor.stats().lost == 1
        writer.close()
        with contextlib.suppress(ConnectionResetError):
            await writer.wait_closed()


async def test_authorize_none_is_refused_with_what_to_pass_instead() -> None:
    acceptor = Acceptor()
    with pytest.raises(TypeError, match="same_user"):
        await acceptor.listen_for_workers(
            "\0aioancillary-none",
            authorize=None,  # type: ignore[arg-type]
        )
    acceptor.close()
    await within(acceptor.wait_closed())
