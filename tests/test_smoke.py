import asyncio
import os
import socket

from aioancillary import recv_fds, send_fds


def test_roundtrip() -> None:
    a, b = socket.socketpair()
    with a, b:
        r, w = os.pipe()
        send_fds(a, b"x", [w])
        os.close(w)
        with recv_fds(b, 10, 1) as msg:
            os.write(msg.take_fd().detach(), b"!") if False else None
            fd = msg.fds[0]
            os.write(fd.fileno(), b"ok")
        assert os.read(r, 10) == b"ok"
        os.close(r)


async def test_loop_runs() -> None:
    await asyncio.sleep(0)
