"""``python -m aioancillary demo``: a live TCP connection moves from one process to another.

Process A listens on 127.0.0.1 and accepts a TCP client; it hands the client's socket to
process B over an aioancillary connection (a Unix socket pair) and closes its own copy.
B answers the client through the socket it received. Every step is narrated with pids and fd
numbers, and both processes finish by counting their open fds to show that nothing leaked.

B is a fresh interpreter started with `subprocess` (``python -m aioancillary demo-worker
FD LOOP``), so it provably never had the client's socket until A sent it. Both run on the loop
chosen with ``--loop`` (see `aioancillary._tools._cli`).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable

from .._asyncio._client import open_unix_connection
from .._asyncio._connection import AncillaryConnection
from ._output import OutputClosed

_LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def _loop_factory(loop: str) -> tuple[_LoopFactory, str]:
    """The factory and a description of ``loop`` (``"asyncio"`` or ``"uvloop"``)."""
    if loop != "uvloop":
        return asyncio.new_event_loop, "the default asyncio loop"
    import uvloop  # noqa: PLC0415 - optional dependency, checked by the command line

    version = getattr(uvloop, "__version__", "")
    return uvloop.new_event_loop, f"uvloop {version}".strip()


def _open_fds() -> int | None:
    """How many fds this process has open, or ``None`` where the kernel does not list them."""
    for directory in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(directory)) - 1  # the listing's own fd does not count
        except OSError:
            continue
    return None


def _leak_verdict(before: int | None, after: int | None) -> str:
    if before is None or after is None:
        return "(this system cannot list open fds, so the count was skipped)"
    if before == after:
        return f"open fds: {before} before, {after} after: nothing leaked"
    return f"open fds: {before} before, {after} after: {after - before:+d} LEAKED"


def _out(text: str) -> None:
    """Print to stdout now; a reader that went away (``demo | head -1``) is `OutputClosed`, not
    a `BrokenPipeError` that the demo's handling of connection errors would take for B's."""
    try:
        # Both processes write to the same terminal: flush so lines appear in the order of events.
        print(text, flush=True)
    except BrokenPipeError:
        raise OutputClosed from None


def _say(who: str, text: str) -> None:
    _out(f"[{who}] {text}")


# -- process B --------------------------------------------------------------------------------


async def _worker(fd: int) -> int:
    me = f"B pid {os.getpid()}"
    conn = await open_unix_connection(sock=socket.socket(fileno=fd))
    async with conn:
        loop = asyncio.get_running_loop()
        before = _open_fds()
        _say(me, f"started; listening to A on Unix socket fd {fd}")
        await conn.send(b"ready")
        with await conn.recv() as msg:  # leaving the block closes any fd not taken
            client = msg.take_fd().into_socket()
        with client:
            host, port = client.getpeername()
            _say(
                me,
                f"received the client's socket as fd {client.fileno()} "
                f"(inode {os.fstat(client.fileno()).st_ino}, client {host}:{port})",
            )
            client.setblocking(False)
            request = (await loop.sock_recv(client, 1024)).decode().strip()
            _say(me, f"read {request!r} from the client; answering through the passed socket")
            reply = f"hello from pid {os.getpid()}, a process the client never connected to"
            await loop.sock_sendall(client, reply.encode() + b"\n")
        # B's copy of the client's socket is closed: the client sees the end of the answer.
        (await conn.recv()).close()  # A asks for B's fd count once the client is done
        verdict = _leak_verdict(before, _open_fds())
        _say(me, f"closed the client's socket when done; {verdict}")
        await conn.send(b"leaked" if "LEAKED" in verdict else b"clean")
        async for msg in conn:  # wait for A to hang up (EOF ends the loop)
            msg.close()
    return 0


# -- process A --------------------------------------------------------------------------------


async def _client(port: int) -> str:
    loop = asyncio.get_running_loop()
    with socket.socket() as sock:
        sock.setblocking(False)
        _say("client", f"connecting to 127.0.0.1:{port} and sending 'hello'")
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, b"hello\n")  # waits in the kernel until someone reads
        reply = b""
        while chunk := await loop.sock_recv(sock, 1024):
            reply += chunk
    _say("client", f"got the answer {reply.decode().strip()!r}")
    return reply.decode()


async def _acceptor(conn: AncillaryConnection, worker_pid: int, worker_fd: int) -> bool:
    me = f"A pid {os.getpid()}"
    loop = asyncio.get_running_loop()
    (await conn.recv()).close()  # B is ready: its startup lines are printed
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setblocking(False)
        port = listener.getsockname()[1]
        before = _open_fds()
        _say(me, f"listening on 127.0.0.1:{port} (TCP, fd {listener.fileno()})")
        client_task = asyncio.create_task(_client(port))
        client, addr = await loop.sock_accept(listener)
        with client:
            fd = client.fileno()
            _say(
                me,
                f"accepted the client {addr[0]}:{addr[1]} as fd {fd} (inode {os.fstat(fd).st_ino})",
            )
            _say(
                me,
                f"sending fd {fd} to B (pid {worker_pid}) over Unix socket fd {worker_fd}, "
                "then closing A's copy",
            )
            await conn.send_fds(b"client", [client])  # the kernel now holds its own reference
        await client_task
        await conn.send(b"report")
        with await conn.recv() as msg:
            worker_clean = msg.data == b"clean"
        verdict = _leak_verdict(before, _open_fds())
        _say(me, "did not read or write a single byte of the client's connection itself")
        _say(me, verdict)
    return worker_clean and "LEAKED" not in verdict


def demo(loop: str) -> int:
    """``python -m aioancillary demo``: run A here and B in a child, both on ``loop``."""
    started = time.perf_counter()
    factory, loop_name = _loop_factory(loop)
    _out(
        "aioancillary demo: process A accepts a TCP client and hands the live connection to "
        "process B,\nwhich answers it. Both processes run on " + loop_name + ".\n"
    )
    failure = ""
    mine, theirs = socket.socketpair()
    try:
        worker = subprocess.Popen(
            [sys.executable, "-m", "aioancillary", "demo-worker", str(theirs.fileno()), loop],
            pass_fds=[theirs.fileno()],
        )
    except BaseException:
        mine.close()
        raise
    finally:
        theirs.close()  # B has its own copy now; A keeps only its end
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            conn = runner.run(open_unix_connection(sock=mine))  # the connection owns `mine`
            try:
                fd = conn.get_extra_info("socket").fileno()
                ok = runner.run(_acceptor(conn, worker.pid, fd))
            except ConnectionError as exc:  # ConnectionClosedError included
                failure = f"process B stopped unexpectedly ({exc})"
                ok = False
            finally:
                conn.close()
                runner.run(conn.wait_closed())
        status = worker.wait(timeout=10)
    finally:
        if worker.poll() is None:  # only after a failure: B is stuck, stop it
            worker.kill()
            worker.wait()
    if status == -signal.SIGPIPE:  # B found the stdout both share closed: so is A's
        raise OutputClosed
    elapsed = time.perf_counter() - started
    if ok and status == 0:
        _out(
            f"\nDone in {elapsed:.1f} s: the TCP connection accepted by pid {os.getpid()} was "
            f"served by pid {worker.pid},\nand neither process leaked a file descriptor."
        )
        return 0
    if failure:
        print(failure, file=sys.stderr)
    print(f"\nSomething went wrong (worker exit status {status}).", file=sys.stderr)
    return 1


def worker_main(argv: list[str]) -> int:
    """Process B: ``demo-worker FD LOOP``, started by `demo` with the socket at ``FD``."""
    if len(argv) != 2 or not argv[0].isdigit() or argv[1] not in ("asyncio", "uvloop"):
        print("demo-worker is started by the demo itself", file=sys.stderr)
        return 2
    factory, _name = _loop_factory(argv[1])
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(_worker(int(argv[0])))
