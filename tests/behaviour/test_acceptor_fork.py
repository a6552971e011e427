"""fork() of a process running an Acceptor: the child's copies never hurt the parent.

Each case runs in a fresh interpreter: an acceptor serves a listener with a worker (both in
the parent), the process forks inside the running loop, and the child closes the acceptor,
leaves through ``asyncio.Runner`` (which closes the inherited loop), or ``os._exit``s. The
parent must still accept and hand over clients.
"""

from __future__ import annotations

import json
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


# A child that leaves through the event loop it inherited: SystemExit raised in a coroutine
# (the main one, a worker's handler task, or a loop of the child's own run inside it), or the
# main coroutine returning. asyncio.run then cancels every task and runs the `async with`
# exits: the acceptor's and the worker's, whose links belong to the parent. The child must exit
# promptly with its status, and the parent, waiting for it, must go on serving.
#
# The parent's own clients are blocking sockets in a thread: an asyncio stream of the parent
# would be torn down by the child's copy of the loop (fork.md); the parent polls for their
# answers rather than wait for a wake-up through the loop's self-pipe. The fork happens where the
# loop has no registration change pending: uvloop (libuv) batches epoll changes in an io_uring
# ring shared with the child, and two processes flushing it abort (see fork.md).
LEAVING = textwrap.dedent(
    """
    import asyncio, concurrent.futures, json, os, socket, sys, time
    import aioancillary as aa

    LOOP, HOW = sys.argv[1], sys.argv[2]
    if LOOP == "uvloop":
        import uvloop
        FACTORY = uvloop.new_event_loop
    else:
        FACTORY = asyncio.new_event_loop
    POOL = concurrent.futures.ThreadPoolExecutor(1)

    async def own_loop_exit():
        raise SystemExit(7)

    def leave():
        if HOW.endswith("systemexit"):
            raise SystemExit(7)
        if HOW.endswith("own-loop"):
            asyncio.run(own_loop_exit())  # the child's own loop; SystemExit goes on up

    def blocking_ask(port, text):
        with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
            sock.sendall(text)
            chunks = []
            while chunk := sock.recv(64):
                chunks.append(chunk)
        return b"".join(chunks)

    async def ask(port, text):
        # Polled: a child tearing down its copy of an asyncio loop unregisters the parent's
        # self-pipe (fork.md), so a call_soon_threadsafe wake-up may never come.
        answer = POOL.submit(blocking_ask, port, text)
        while not answer.done():
            await asyncio.sleep(0.005)
        return answer.result()

    async def handler(client):
        loop = asyncio.get_running_loop()
        request = await loop.sock_recv(client.sock, 16)
        if request == b"fork":
            pid = os.fork()
            if pid == 0:
                leave()
                return
            await loop.sock_sendall(client.sock, str(pid).encode())
        else:
            await loop.sock_sendall(client.sock, b"pong")

    async def wait_child(pid):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            await asyncio.sleep(0.01)
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        return "hung"

    async def main():
        async with aa.Acceptor() as acceptor:
            listener = socket.create_server(("127.0.0.1", 0))
            acceptor.add_listener(listener)
            port = listener.getsockname()[1]
            ours, theirs = socket.socketpair()
            acceptor.add_worker(ours)
            async with await aa.Worker.connect(sock=theirs) as worker:
                serving = asyncio.ensure_future(worker.serve(handler))
                assert await ask(port, b"ping") == b"pong"
                if HOW.startswith("main"):
                    pid = os.fork()
                    if pid == 0:
                        leave()
                        return "child"
                else:
                    pid = int(await ask(port, b"fork"))
                status = await wait_child(pid)
                answers = [(await ask(port, b"ping")).decode() for _ in range(3)]
                acceptor.close()
                await serving
        return {"child": status, "answers": answers}

    with asyncio.Runner(loop_factory=FACTORY) as runner:
        result = runner.run(main())
    POOL.shutdown()
    if result != "child":
        print(json.dumps(result))
    """
)


@pytest.mark.parametrize(
    ("how", "status"),
    [
        ("main-systemexit", 7),
        ("main-return", 0),
        ("main-own-loop", 7),
        ("handler-systemexit", 7),
    ],
)
@pytest.mark.parametrize("loop", LOOP_NAMES)
def test_a_child_leaving_through_its_inherited_loop_exits_promptly(
    loop: str, how: str, status: int
) -> None:
    result = subprocess.run(
        [sys.executable, "-c", LEAVING, loop, how],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out == {"child": status, "answers": ["pong"] * 3}, result.stderr


def test_a_closed_acceptor_forks_cleanly() -> None:
    script = textwrap.dedent(
        """
        import asyncio, os, socket
        import aioancillary as aa

        async def main():
            acceptor = aa.Acceptor()
            acceptor.add_listener(socket.create_server(("127.0.0.1", 0)))
            acceptor.close()
            await acceptor.wait_closed()
            pid = os.fork()
            if pid == 0:
                # The child's copy is inert, and every wait returns at once.
                ok = acceptor.stats().workers == 0 and await acceptor.drain()
                await acceptor.wait_closed()
                os._exit(0 if ok and not acceptor.listeners else 3)
            _, status = os.waitpid(pid, 0)
            print(os.waitstatus_to_exitcode(status))

        asyncio.run(main())
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0", result.stderr
