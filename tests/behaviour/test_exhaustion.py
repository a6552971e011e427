"""The receiver at its RLIMIT_NOFILE: a clear error, nothing leaked, the process still usable.

RLIMIT_NOFILE is process-wide, so every case runs in a child process (``python -c``) that
lowers it and prints what it saw as one JSON line; the test asserts on that. Each child runs
on the event loop named on its command line, so every case covers asyncio and uvloop.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from helpers import LOOP_NAMES

PRELUDE = textwrap.dedent(
    """
    import array, asyncio, json, os, resource, socket, struct, sys
    import aioancillary as aa

    if sys.argv[1] == "uvloop":
        import uvloop
        LOOP = uvloop.new_event_loop
        uvloop.new_event_loop().close()  # libuv's 2 process-lifetime fds: part of the baseline
    else:
        LOOP = asyncio.new_event_loop
    SOFT, HARD = resource.getrlimit(resource.RLIMIT_NOFILE)

    def count():
        return len(os.listdir("/proc/self/fd")) - 1

    def frame(nfds, payload):
        return struct.pack(">BBHI", 1, 0, nfds, len(payload)) + payload

    def rights(fds):
        return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]

    def limit(soft):
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, HARD))

    def report(**fields):
        print(json.dumps(fields))
    """
)


def run_child(body: str, *args: str, timeout: float = 60) -> dict[str, Any]:
    script = PRELUDE + textwrap.dedent(body)
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{proc.stderr}"
    lines = proc.stdout.strip().splitlines()
    assert lines, f"child printed nothing; stderr:\n{proc.stderr}"
    result: dict[str, Any] = json.loads(lines[-1])
    result["stderr"] = proc.stderr
    return result


# -- EMFILE during recvmsg ------------------------------------------------------------------

EMFILE_ON_RECEIVE = """
async def main():
    ours, peer = socket.socketpair()
    conn = await aa.open_unix_connection(sock=ours)
    r, w = os.pipe()
    peer.sendmsg([frame(1, b"before")], rights([r]))
    with await conn.recv() as msg:
        before = [msg.data.decode(), len(msg.fds)]
    base = count()
    limit(base + 8)  # room for a few fds of the 253 about to arrive
    peer.sendmsg([frame(253, b"big")], rights([r] * 253))
    try:
        msg = await asyncio.wait_for(conn.recv(), 5)
        msg.close()
        error = None
    except Exception as exc:  # what the application sees
        error = exc
    await conn.wait_closed()  # the stream lost fds: the connection is failed and closed
    at_limit = count() + 1  # its socket included, as in the baseline
    peer.close()
    # Still usable, at the same low limit: a new connection passes an fd.
    a, b = await aa.connection_pair()
    await a.send_fds(b"after", [w])
    with await asyncio.wait_for(b.recv(), 5) as msg:
        after = [msg.data.decode(), len(msg.fds)]
    for c in (a, b):
        c.close()
        await c.wait_closed()
    limit(SOFT)
    report(
        before=before,
        error=type(error).__name__,
        message=str(error),
        closed_fds=getattr(error, "closed_fds", None),
        data=getattr(error, "data", b"").hex(),
        base=base,
        at_limit=at_limit,
        after=after,
        final=count(),
    )

with asyncio.Runner(loop_factory=LOOP) as runner:
    runner.run(main())
"""


@pytest.mark.parametrize("loop_name", LOOP_NAMES)
def test_emfile_during_recvmsg_is_a_clear_error_and_leaks_nothing(loop_name: str) -> None:
    out = run_child(EMFILE_ON_RECEIVE, loop_name)
    assert out["before"] == ["before", 1]
    assert out["error"] == "FdTruncatedError", out
    assert "RLIMIT_NOFILE" in out["message"]
    # The kernel installed what fitted (about 8 of 253) and set MSG_CTRUNC; all were closed.
    assert 0 < out["closed_fds"] < 253
    assert bytes.fromhex(out["data"]).endswith(b"big")
    assert out["at_limit"] == out["base"]
    assert out["after"] == ["after", 1]


# -- the receive queue's fd budget ------------------------------------------------------------

SLOW_CONSUMER = """
BUDGET = int(sys.argv[2])
COUNT = 60  # 60 * 253 = 15180 fds: far more than the limit set below
ours, peer = socket.socketpair()
r, w = os.pipe()
pid = os.fork()  # the flooding peer is another process: its fds in flight are not ours
if pid == 0:
    ours.close()
    try:
        for i in range(COUNT):
            peer.sendmsg([frame(253, i.to_bytes(4, "big"))], rights([r] * 253))
        peer.shutdown(socket.SHUT_WR)
    finally:
        os._exit(0)
peer.close()

async def main():
    conn = await aa.open_unix_connection(sock=ours, max_queued_fds=BUDGET)
    base = count()
    ceiling = base + 2 * 253 + 3 * 253 + 16
    limit(ceiling)
    await asyncio.sleep(0.3)  # a slow consumer: the flood piles up meanwhile
    peak = count() - base
    seen = 0
    error = None
    try:
        async with asyncio.timeout(10):
            async for msg in conn:
                with msg:
                    assert int.from_bytes(msg.data, "big") == seen
                    assert len(msg.fds) == 253
                    seen += 1
                    try:
                        peak = max(peak, count() - base)
                    except OSError:  # listing /proc/self/fd needs an fd too
                        peak = ceiling - base
    except Exception as exc:
        error = exc
    conn.close()
    await conn.wait_closed()
    os.waitpid(pid, 0)
    limit(SOFT)
    report(seen=seen, count=COUNT, error=type(error).__name__ if error else None,
           peak=peak, room=ceiling - base, leaked=count() - base + 1)

with asyncio.Runner(loop_factory=LOOP) as runner:
    runner.run(main())
"""


@pytest.mark.parametrize("loop_name", LOOP_NAMES)
def test_fd_budget_keeps_a_slow_consumer_below_its_limit(loop_name: str) -> None:
    out = run_child(SLOW_CONSUMER, loop_name, str(2 * 253))
    assert out["error"] is None, out
    assert out["seen"] == out["count"]
    assert out["peak"] <= 2 * 253 + 253, out  # the budget plus one read
    assert out["peak"] < out["room"]
    assert out["leaked"] == 0


@pytest.mark.parametrize("loop_name", LOOP_NAMES)
def test_without_the_budget_the_same_flood_reaches_the_limit(loop_name: str) -> None:
    # The control experiment: the same flood and limit with an unbounded queue hit EMFILE.
    out = run_child(SLOW_CONSUMER, loop_name, str(10**9))
    assert out["error"] == "FdTruncatedError", out
    assert out["leaked"] == 0


HOSTILE_AT_1024 = """
limit(1024)  # the usual default soft limit; the default fd budget is then 1024 // 4
ours, peer = socket.socketpair()
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    ours.close()
    try:
        # 253 fds no frame claims (the decoder's limit: one more is a ProtocolError), then
        # whole frames
        peer.sendmsg([frame(0, b"u")], rights([r] * 253))
        for _ in range(200):
            peer.sendmsg([frame(253, b"f")], rights([r] * 253))
    except OSError:
        pass
    os._exit(0)
peer.close()

async def main():
    conn = await aa.open_unix_connection(sock=ours)  # a consumer that never reads
    base = count()
    await asyncio.sleep(0.3)
    pinned = count() - base
    opened = []
    try:
        for _ in range(64):  # the rest of the process needs fds too
            opened.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        pass
    for fd in opened:
        os.close(fd)
    error = None
    try:
        for _ in range(8):  # what is queued, then the connection's error if it failed
            (await asyncio.wait_for(conn.recv(), 0.2)).close()
    except asyncio.TimeoutError:
        pass  # still open and paused: no error
    except Exception as exc:  # FdTruncatedError: the process did reach its limit
        error = type(exc).__name__
    conn.abort()
    await conn.wait_closed()
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    report(pinned=pinned, opened=len(opened), error=error)

with asyncio.Runner(loop_factory=LOOP) as runner:
    runner.run(main())
"""


@pytest.mark.parametrize("loop_name", LOOP_NAMES)
def test_one_hostile_connection_cannot_fill_a_1024_fd_table(loop_name: str) -> None:
    # The receive-queue budget (256 here) counts the decoder's unclaimed fds too; one read
    # past it (253) comes on top: the process keeps the rest of its table.
    out = run_child(HOSTILE_AT_1024, loop_name)
    assert out["error"] is None, f"the process reached its fd limit: {out}"
    assert out["opened"] == 64, f"one connection pinned {out['pinned']} of 1024 fds: {out}"


# -- accept() at the limit --------------------------------------------------------------------

ACCEPT_AT_LIMIT = """
import tempfile
PATH = os.path.join(tempfile.mkdtemp(), "srv.sock")
CLIENTS = 6

async def main():
    served = []

    async def handler(conn):
        with await conn.recv() as msg:
            served.append(msg.data.decode())

    server = await aa.start_unix_server(handler, PATH)
    clients = []
    for i in range(CLIENTS):
        c = socket.socket(socket.AF_UNIX)
        c.connect(PATH)  # queued in the backlog, not accepted yet
        c.sendall(frame(0, b"c%d" % i))
        clients.append(c)
    base = count()
    limit(base + 3)  # two accepted connections at a time (and one spare for accept)
    async with asyncio.timeout(10):
        while len(served) < CLIENTS:
            await asyncio.sleep(0.01)
    limit(SOFT)
    for c in clients:
        c.close()
    server.close()
    await server.wait_closed()
    report(served=sorted(served), final=count() - (base - CLIENTS - 1))

with asyncio.Runner(loop_factory=LOOP) as runner:
    runner.run(main())
"""


@pytest.mark.parametrize("loop_name", LOOP_NAMES)
def test_server_at_its_limit_keeps_serving(loop_name: str, tmp_path: Path) -> None:
    out = run_child(ACCEPT_AT_LIMIT, loop_name)
    assert out["served"] == [f"c{i}" for i in range(6)]
    assert out["final"] == 0
    # It did hit EMFILE, backed off, and logged the episode once (not once per retry).
    assert out["stderr"].count("cannot accept ([Errno 24]") == 1
