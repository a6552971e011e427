"""fork() of a process running an Acceptor: the child's copies never hurt the parent.

Each case runs in a fresh interpreter: an acceptor serves a listener with a worker (both in
the parent), the process forks inside the running loop, and the child closes the acceptor,
leaves through ``asyncio.Runner`` (which closes the inherited loop), or ``os._exit``s. The
parent must still accept and hand over clients.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from helpers import LOOP_NAMES

SCRIPT = textwrap.dedent(
    """
    import asyncio, os, socket, sys
    import aioancillary as aa

    LOOP, CHILD = sys.argv[1], sys.argv[2]
    if LOOP == "uvloop":
        import uvloop
        FACTORY = uvloop.new_event_loop
    else:
        FACTORY = asyncio.new_event_loop

    async def ask(port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"ping")
        answer = await reader.read()
        writer.close()
        await writer.wait_closed()
        return answer

    async def main():
        acceptor = aa.Acceptor()
        listener = socket.create_server(("127.0.0.1", 0))
        acceptor.add_listener(listener)
        port = listener.getsockname()[1]
        ours, theirs = socket.socketpair()
        acceptor.add_worker(ours)
        worker = await aa.Worker.connect(sock=theirs)

        async def serve():
            async for client in worker:
                with client:
                    loop = asyncio.get_running_loop()
                    await loop.sock_recv(client.sock, 16)
                    await loop.sock_sendall(client.sock, b"pong")

        serving = asyncio.ensure_future(serve())
        assert await ask(port) == b"pong"
        pid = os.fork()
        if pid == 0:
            if CHILD == "close":
                acceptor.close()
                os._exit(0)
            if CHILD == "runner":
                return "child"
            os._exit(0)
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            await asyncio.sleep(0.005)
        async with asyncio.timeout(5):
            answers = [await ask(port) for _ in range(3)]
        acceptor.close()
        await serving
        worker.close()
        await acceptor.wait_closed()
        return answers

    with asyncio.Runner(loop_factory=FACTORY) as runner:
        result = runner.run(main())
    if result != "child":
        print(result)
    """
)


@pytest.mark.parametrize("child", ["close", "runner", "exit"])
@pytest.mark.parametrize("loop", LOOP_NAMES)
def test_a_forked_child_leaves_the_parents_acceptor_working(loop: str, child: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, loop, child],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[b'pong', b'pong', b'pong']", result.stdout + result.stderr
