"""The acceptor at its RLIMIT_NOFILE: paced retries logged once per episode, then service.

RLIMIT_NOFILE is process-wide, so the case runs in a child process (``python -c``) on the loop
named on its command line; it prints what it saw as one JSON line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from helpers import LOOP_NAMES
from helpers.speedups import require_extension

SCRIPT = textwrap.dedent(
    """
    import asyncio, errno, json, logging, os, resource, socket, sys
    import aioancillary as aa
    from aioancillary._kernel import _accel

    if sys.argv[1] == "uvloop":
        import uvloop
        LOOP = uvloop.new_event_loop
    else:
        LOOP = asyncio.new_event_loop
    SOFT, HARD = resource.getrlimit(resource.RLIMIT_NOFILE)
    CLIENTS = 4
    RETRIES = 4

    class Records(logging.Handler):
        def __init__(self):
            super().__init__()
            self.lines = []

        def emit(self, record):
            self.lines.append((record.levelname, record.getMessage()))

    records = Records()
    logging.getLogger("aioancillary").addHandler(records)
    logging.getLogger("aioancillary").setLevel(logging.DEBUG)

    def count():
        return len(os.listdir("/proc/self/fd")) - 1

    async def wait_for(predicate, timeout=20):
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.005)

    async def main():
        acceptor = aa.Acceptor()
        listener = socket.create_server(("127.0.0.1", 0))
        acceptor.add_listener(listener)
        ours, theirs = socket.socketpair()
        acceptor.add_worker(ours)
        worker = await aa.Worker.connect(sock=theirs)
        loop = asyncio.get_running_loop()
        answers = []

        async def serve(client):
            await loop.sock_sendall(client.sock, b"served")

        serving = asyncio.ensure_future(worker.serve(serve))
        await acceptor.wait_workers(1)
        # Count the accept() calls that fail with EMFILE (the real error, from the kernel).
        entry = acceptor._listeners.items[0]
        real = entry.accept
        emfile = [0]

        def accept():
            try:
                return real()
            except OSError as exc:
                if exc.errno == errno.EMFILE:
                    emfile[0] += 1
                raise

        entry.accept = accept
        c_burst = _accel.accept_into  # the C path: its burst reports the kernel's EMFILE

        def accept_into(fd, limit, into, prefix):
            failure = c_burst(fd, limit, into, prefix)
            if failure is not None and failure.error.errno == errno.EMFILE:
                emfile[0] += 1
            return failure

        if c_burst is not None:
            _accel.accept_into = accept_into
        clients = [socket.socket() for _ in range(CLIENTS)]
        resource.setrlimit(resource.RLIMIT_NOFILE, (count(), HARD))  # not one fd more
        for client in clients:
            # A blocking connect needs no new fd here; the client waits in the backlog.
            client.connect(listener.getsockname())
        await wait_for(lambda: emfile[0] >= RETRIES)
        during = list(records.lines)
        accepting = acceptor.stats().accepting
        resource.setrlimit(resource.RLIMIT_NOFILE, (SOFT, HARD))
        for client in clients:
            client.settimeout(20)
            answers.append(await loop.run_in_executor(None, client.recv, 16))
            client.close()
        await wait_for(lambda: acceptor.stats().completed == len(clients))
        stats = acceptor.stats()
        acceptor.close()
        await serving
        worker.close()
        await acceptor.wait_closed()
        print(json.dumps({
            "clients": len(clients),
            "answers": [a.decode() for a in answers],
            "emfile": emfile[0],
            "during": during,
            "after": records.lines[len(during):],
            "accepting": accepting,
            "failed_listeners": list(getattr(stats, "failed_listeners", ())),
            "path": _accel.PATH,
        }))

    with asyncio.Runner(loop_factory=LOOP) as runner:
        runner.run(main())
    """
)


@pytest.mark.parametrize("path", ["python", "C"])
@pytest.mark.parametrize("loop_name", LOOP_NAMES)
def test_emfile_in_the_acceptor_is_logged_once_and_recovers(loop_name: str, path: str) -> None:
    env = dict(os.environ)
    if path == "python":
        env["AIOANCILLARY_NO_EXTENSIONS"] = "1"
    else:
        require_extension()
        env.pop("AIOANCILLARY_NO_EXTENSIONS", None)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, loop_name],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["path"].startswith(path if path == "C" else "pure Python"), out
    assert out["clients"] >= 1, out
    assert out["emfile"] >= 4, out
    # One line for the whole episode, however many retries it took (not one per retry).
    errors = [text for level, text in out["during"] if level == "ERROR"]
    assert len(errors) == 1, out["during"]
    assert "Too many open files" in errors[0]
    assert not out["accepting"]  # paused between paced retries, not spinning on readiness
    # Then every client is served, the end of the episode is said once, nothing dropped.
    assert out["answers"] == ["served"] * out["clients"]
    assert [level for level, text in out["after"] if "accepts again" in text] == ["WARNING"]
    assert [text for level, text in out["after"] if level == "ERROR"] == []
    assert out["failed_listeners"] == []
