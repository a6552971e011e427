"""User-space instructions per message, counted with callgrind: both hot paths and the anchors.

Instruction counts do not depend on the machine's load, so this is the comparison to iterate
with on a shared machine (the wall-clock harness, ``run.py``, is for a quiet one). Each cell
runs both sides in one process (one event loop, or alternating blocking calls for the
stdlib), twice under ``valgrind --tool=callgrind`` with two message counts; the difference of
the two totals over the difference of the counts is the cost of one message (start-up, imports
and set-up cancel out). Kernel time is not counted: a system call costs one instruction here
however long the kernel takes, so the C reference (one ``sendmsg`` and one ``recvmsg`` per
message) is near zero and is not a row.

    .venv/bin/python benchmarks/callgrind_paths.py            # every cell, a Markdown table
    .venv/bin/python benchmarks/callgrind_paths.py --only stream-1fd
    .venv/bin/python benchmarks/callgrind_paths.py --sender-only --only 'aioancillary-*'

``--sender-only`` counts the sending side alone (aioancillary rows, one-way cases): the
receiver is a plain ``recvmsg`` loop in another process, which callgrind does not trace.

Rows: ``aioancillary-{loop}-c`` (the C extension), ``aioancillary-{loop}-py`` (pure Python),
``naive-{loop}`` (the careful ``add_reader`` loop of ``impl_naive``), ``stdlib`` (blocking
``socket.send_fds``/``recv_fds``). Cases: framed stream with 1 and 4 fds, seqpacket with 1 fd,
a raw (unframed) stream with 1 fd, and a ping-pong round trip (1 fd each way).
"""

from __future__ import annotations

import argparse
import asyncio
import fnmatch
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CASES = {
    # name: (socket type, fds per message, framed, ping-pong)
    "stream-1fd": (socket.SOCK_STREAM, 1, True, False),
    "stream-4fd": (socket.SOCK_STREAM, 4, True, False),
    "seqpacket-1fd": (socket.SOCK_SEQPACKET, 1, True, False),
    "raw-stream-1fd": (socket.SOCK_STREAM, 1, False, False),
    "pingpong": (socket.SOCK_STREAM, 1, True, True),
}
IMPLS = [
    "aioancillary-asyncio-c",
    "aioancillary-asyncio-py",
    "aioancillary-uvloop-c",
    "aioancillary-uvloop-py",
    "naive-asyncio",
    "naive-uvloop",
    "stdlib",
]
COUNTS = (500, 2500)
PAYLOAD = b"x" * 16
_SENDER_ONLY = "AIOANCILLARY_CALLGRIND_SENDER_ONLY"
# The untraced receiver of --sender-only: reads until EOF, closing every fd that arrives.
_DRAIN = """
import array, os, socket, sys
sock = socket.socket(fileno=int(sys.argv[1]))
while True:
    data, anc, _flags, _addr = sock.recvmsg(1 << 16, socket.CMSG_SPACE(253 * 4))
    for _level, _kind, raw in anc:
        fds = array.array("i")
        fds.frombytes(raw[: len(raw) - len(raw) % fds.itemsize])
        for fd in fds:
            os.close(fd)
    if not data and not anc:
        break
"""


def _loop_factory(name: str) -> asyncio.AbstractEventLoop:
    if name == "uvloop":
        import uvloop  # noqa: PLC0415 - bench-only dependency

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


async def _aioancillary(case: str, path: str, n: int) -> None:
    from aioancillary import connection_pair  # noqa: PLC0415

    try:
        from aioancillary._kernel import _accel  # noqa: PLC0415
    except ImportError:  # a tree from before the extension (--src): pure Python only
        assert path == "py", "this tree has no C extension"
    else:
        _accel.use_extension(path == "c")
    kind, nfds, framed, pingpong = CASES[case]
    if os.environ.get(_SENDER_ONLY):
        await _sender_only(kind, nfds, framed, n)
        return
    a, b = await connection_pair(kind, framed=framed if kind == socket.SOCK_STREAM else None)
    fd = os.open(os.devnull, os.O_RDONLY)
    fds = [fd] * nfds
    if pingpong:
        for _ in range(n):
            await a.send_fds(PAYLOAD, fds)
            with await b.recv():
                pass
            await b.send_fds(PAYLOAD, fds)
            with await a.recv():
                pass
    else:

        async def send() -> None:
            for _ in range(n):
                await a.send_fds(PAYLOAD, fds)

        sender = asyncio.create_task(send())
        got = 0
        async for msg in b:
            with msg:
                got += len(msg.data)
            if got >= n * len(PAYLOAD):
                break
        await sender
    os.close(fd)
    a.close()
    b.close()
    await a.wait_closed()
    await b.wait_closed()


def _start_drain(sock: socket.socket) -> subprocess.Popen[bytes]:
    """The receiver of --sender-only, in a process of its own (it takes ``sock`` over)."""
    with sock:
        return subprocess.Popen(
            [sys.executable, "-c", _DRAIN, str(sock.fileno())], pass_fds=[sock.fileno()]
        )


async def _sender_only(kind: int, nfds: int, framed: bool, n: int) -> None:
    from aioancillary import AncillaryConnection  # noqa: PLC0415

    left, right = socket.socketpair(socket.AF_UNIX, kind)
    drain = _start_drain(right)
    a = AncillaryConnection(left, framed=framed if kind == socket.SOCK_STREAM else None)
    fd = os.open(os.devnull, os.O_RDONLY)
    fds = [fd] * nfds
    for _ in range(n):
        await a.send_fds(PAYLOAD, fds)
    await a.drain()
    os.close(fd)
    a.close()
    await a.wait_closed()
    await asyncio.to_thread(drain.wait)


async def _naive(case: str, n: int) -> None:
    sys.path.insert(0, str(HERE))
    from impl_naive import Reader, sendmsg  # noqa: PLC0415

    kind, nfds, _framed, pingpong = CASES[case]
    left, right = socket.socketpair(socket.AF_UNIX, kind)
    left.setblocking(False)
    right.setblocking(False)
    fd = os.open(os.devnull, os.O_RDONLY)
    fds = [fd] * nfds
    rb, lb = Reader(right, len(PAYLOAD), nfds), Reader(left, len(PAYLOAD), nfds)
    if pingpong:
        for _ in range(n):
            await sendmsg(left, PAYLOAD, fds)
            await rb.recv()
            await sendmsg(right, PAYLOAD, fds)
            await lb.recv()
    else:

        async def send() -> None:
            for _ in range(n):
                await sendmsg(left, PAYLOAD, fds)

        sender = asyncio.create_task(send())
        for _ in range(n):
            await rb.recv()
        await sender
    rb.close()
    lb.close()
    os.close(fd)
    left.close()
    right.close()


def _stdlib(case: str, n: int) -> None:
    kind, nfds, _framed, pingpong = CASES[case]
    left, right = socket.socketpair(socket.AF_UNIX, kind)
    fd = os.open(os.devnull, os.O_RDONLY)
    fds = [fd] * nfds
    block = 1 if pingpong else 32  # what fits in the socket's buffer before a read
    for _ in range(0, n, block):
        for _ in range(block):
            socket.send_fds(left, [PAYLOAD], fds)
        for _ in range(block):
            _data, got, _flags, _addr = socket.recv_fds(right, len(PAYLOAD), nfds)
            for f in got:
                os.close(f)
        if pingpong:
            socket.send_fds(right, [PAYLOAD], fds)
            _data, got, _flags, _addr = socket.recv_fds(left, len(PAYLOAD), nfds)
            for f in got:
                os.close(f)
    os.close(fd)
    left.close()
    right.close()


def child(case: str, impl: str, n: int) -> None:
    if impl == "stdlib":
        _stdlib(case, n)
        return
    parts = impl.split("-")
    loop = parts[1]
    with asyncio.Runner(loop_factory=lambda: _loop_factory(loop)) as runner:
        if parts[0] == "naive":
            runner.run(_naive(case, n))
        else:
            runner.run(_aioancillary(case, parts[2], n))


def count(case: str, impl: str, n: int, src: str = "", sender_only: bool = False) -> int:
    """Instructions of one whole run (callgrind's "Collected" total).

    ``src``: another tree's ``src`` directory to import aioancillary from (a baseline).
    ``sender_only``: the receiver runs in an untraced process.
    """
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    if sender_only:
        env[_SENDER_ONLY] = "1"
    if src:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    result = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            __file__,
            "--child",
            case,
            impl,
            str(n),
        ],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    match = re.search(r"Collected : (\d+)", result.stderr)
    if match is None:
        raise RuntimeError(f"no callgrind total in:\n{result.stderr[-2000:]}")
    return int(match.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[], help="case or impl (glob)")
    parser.add_argument(
        "--src", default="", help="import aioancillary from this src/ (e.g. a baseline tree)"
    )
    parser.add_argument(
        "--sender-only",
        action="store_true",
        help="count the sender alone (aioancillary rows, one-way cases)",
    )
    parser.add_argument("--child", nargs=3, metavar=("CASE", "IMPL", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 1

    def wanted(name: str) -> bool:
        return not args.only or any(fnmatch.fnmatch(name, p) for p in args.only)

    cases = [c for c in CASES if wanted(c) or not any(wanted(c) for c in CASES)]
    impls = [i for i in IMPLS if wanted(i) or not any(wanted(i) for i in IMPLS)]
    if args.sender_only:
        cases = [c for c in cases if not CASES[c][3]]
        impls = [i for i in impls if i.startswith("aioancillary-")]
    table: dict[tuple[str, str], float] = {}
    for case in cases:
        for impl in impls:
            low, high = (count(case, impl, n, args.src, args.sender_only) for n in COUNTS)
            table[case, impl] = (high - low) / (COUNTS[1] - COUNTS[0])
            print(f"{case:15} {impl:24} {table[case, impl] / 1000:7.1f}k", file=sys.stderr)
    unit = "round trip" if cases == ["pingpong"] else "message (ping-pong: round trip)"
    sides = "the sender alone" if args.sender_only else "both sides"
    print(f"\nUser-space instructions per {unit}, {sides}, thousands (callgrind):\n")
    print("| impl | " + " | ".join(cases) + " |")
    print("|---|" + "---:|" * len(cases))
    for impl in impls:
        print(f"| {impl} | " + " | ".join(f"{table[c, impl] / 1000:.1f}k" for c in cases) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
