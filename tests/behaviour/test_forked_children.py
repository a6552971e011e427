"""fork(): what a child does with its inherited copies must never hurt the parent.

The child of a process running an event loop shares the loop's epoll instance with its parent.
Each case runs in a fresh interpreter (``python -c``): the parent opens a connection pair and a
server, forks inside the running loop, and the child then closes everything the library's way,
exits through ``asyncio.Runner`` (which closes the inherited loop), or leaves with ``os._exit``.
The parent must still receive on its connection and accept on its server, and leak nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import LOOP_NAMES

SCRIPT = textwrap.dedent(
    """
    import asyncio, json, os, sys
    import aioancillary as aa

    LOOP, CHILD, PATH = sys.argv[1], sys.argv[2], sys.argv[3]
    if LOOP == "uvloop":
        import uvloop
        FACTORY = uvloop.new_event_loop
        uvloop.new_event_loop().close()  # libuv's own fds, before the baseline
    else:
        FACTORY = asyncio.new_event_loop

    async def echo(conn):
        async for msg in conn:
            with msg:
                await conn.send(b"echo:" + msg.data)

    async def main():
        before = len(os.listdir("/proc/self/fd"))
        a, b = await aa.connection_pair()
        server = await aa.start_unix_server(echo, PATH)
        await b.send(b"before fork")
        with await a.recv() as msg:
            assert msg.data == b"before fork"
        pid = os.fork()
        if pid == 0:
            if CHILD == "close":
                a.close()
                b.close()
                server.close(unlink=False)
                os._exit(0)
            if CHILD == "runner":
                return None  # asyncio.Runner closes the inherited loop in the child
            os._exit(0)
        # The parent: wait for the child with timers only (a child closing an inherited
        # uvloop loop may take the loop's own wake-up fds with it; that is the loop's).
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            await asyncio.sleep(0.005)
        await b.send(b"after fork")
        async with asyncio.timeout(5):
            with await a.recv() as msg:
                received = msg.data.decode()
            client = await aa.open_unix_connection(PATH)
            await client.send(b"hello")
            with await client.recv() as msg:
                echoed = msg.data.decode()
        for conn in (a, b, client):
            conn.close()
            await conn.wait_closed()
        server.close()
        server.close_clients()
        await server.wait_closed()
        return {"received": received, "echoed": echoed,
                "fds": len(os.listdir("/proc/self/fd")) - before}

    with asyncio.Runner(loop_factory=FACTORY) as runner:
        result = runner.run(main())
    if result is not None:
        print(json.dumps(result))
    """
)


@pytest.mark.parametrize("child", ["close", "runner", "exit"])
@pytest.mark.parametrize("loop_name", LOOP_NAMES)
def test_a_forked_child_never_disturbs_the_parent(
    tmp_path: Path, loop_name: str, child: str
) -> None:
    path = tmp_path / "s.sock"
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, loop_name, child, str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"received": "after fork", "echoed": "echo:hello", "fds": 0}


NOTIFY_SCRIPT = textwrap.dedent(
    """
    import asyncio, os, socket, sys
    from aioancillary._lifecycle._notify import notify_async

    LOOP, CHILD, PATH, TESTS = sys.argv[1:5]
    sys.path.insert(0, TESTS)
    from helpers import fill_queue
    if LOOP == "uvloop":
        import uvloop
        FACTORY = uvloop.new_event_loop
    else:
        FACTORY = asyncio.new_event_loop
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(PATH)
    os.environ["NOTIFY_SOCKET"] = PATH
    queued = fill_queue(PATH)  # a full queue: the notification must wait for room

    async def main():
        before = len(os.listdir("/proc/self/fd"))
        task = asyncio.ensure_future(notify_async(status="after fork"))
        for _ in range(10):
            await asyncio.sleep(0)
        assert not task.done()  # it waits for the socket to become writable
        pid = os.fork()
        if pid == 0:
            if CHILD == "runner":
                return None  # asyncio.Runner closes the inherited loop in the child
            os._exit(0)
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            await asyncio.sleep(0.005)
        for _ in range(queued):
            manager.recv(16)
        async with asyncio.timeout(5):
            assert await task is True
        assert len(os.listdir("/proc/self/fd")) == before, "an fd leaked"
        return manager.recv(64)

    with asyncio.Runner(loop_factory=FACTORY) as runner:
        result = runner.run(main())
    if result is not None:
        print(result.decode())
    """
)


@pytest.mark.parametrize("child", ["runner", "exit"])
@pytest.mark.parametrize("loop_name", LOOP_NAMES)
def test_a_forked_child_never_disturbs_a_waiting_notify_async(
    tmp_path: Path, loop_name: str, child: str
) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            NOTIFY_SCRIPT,
            loop_name,
            child,
            str(tmp_path / "notify.sock"),
            str(Path(__file__).resolve().parents[1]),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "STATUS=after fork"
