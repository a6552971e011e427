"""``python -m aioancillary demo``: two processes, one open file passed between them."""

from __future__ import annotations

import os
import socket
import sys
import tempfile

from ._blocking import recv_fds, send_fds


def _demo() -> int:
    parent, child = socket.socketpair()
    with tempfile.TemporaryFile() as log:
        log.write(b"written by the parent before the handoff\n")
        log.flush()
        pid = os.fork()
        if pid == 0:  # the child: receives the file and writes through it
            parent.close()
            with recv_fds(child, 64, 1) as msg:
                fd = msg.take_fd()
                os.write(fd.fileno(), b"written by the child through the passed fd\n")
                fd.close()
            os._exit(0)
        child.close()
        send_fds(parent, b"log", [log])
        print(f"parent {os.getpid()}: sent fd {log.fileno()} to child {pid}")
        os.waitpid(pid, 0)
        parent.close()
        log.seek(0)
        print("the file now reads:")
        sys.stdout.write(log.read().decode())
    return 0


def main(argv: list[str]) -> int:
    """Entry point of ``python -m aioancillary``."""
    if argv[:1] != ["demo"]:
        print("usage: python -m aioancillary demo", file=sys.stderr)
        return 2
    return _demo()
