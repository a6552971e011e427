"""A minimal stand-in for systemd-socket-activate, for the cases the real one cannot produce.

``activate.py SPEC CMD...`` opens the fds described by the JSON ``SPEC``, moves them to fds 3,
4, ..., sets ``LISTEN_PID``/``LISTEN_FDS``/``LISTEN_FDNAMES`` and execs ``CMD`` (the pid stays
the same across exec, as with the real tool). SPEC keys:

* ``fds``: kinds to open, in order: ``"tcp"`` (listening on 127.0.0.1), ``"udp"``,
  ``"unix-dgram"``, ``"pipe"`` (read end), ``"memfd"``;
* ``names``: the LISTEN_FDNAMES value (omitted: variable not set);
* ``pid``: ``"self"`` (default) or ``"other"`` (a pid that is not the exec'd program's);
* ``count``: the LISTEN_FDS value (default: the number of fds; more claims fds not open).
"""

from __future__ import annotations

import json
import os
import socket
import sys


def open_kind(kind: str) -> int:
    if kind == "tcp":
        sock = socket.create_server(("127.0.0.1", 0))
    elif kind == "udp":
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
    elif kind == "unix-dgram":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    elif kind == "pipe":
        r, w = os.pipe()
        os.close(w)
        return r
    elif kind == "memfd":
        return os.memfd_create("activate-test")
    else:
        raise SystemExit(f"unknown fd kind {kind!r}")
    return sock.detach()


def main() -> None:
    spec = json.loads(sys.argv[1])
    cmd = sys.argv[2:]
    opened = [open_kind(kind) for kind in spec.get("fds", [])]
    # Move them above the target range first, so that placing one never overwrites another.
    high = [os.dup2(fd, 100 + i) for i, fd in enumerate(opened)]
    for fd in opened:
        os.close(fd)
    for i, fd in enumerate(high):
        os.dup2(fd, 3 + i, inheritable=True)
        os.close(fd)
    pid = os.getpid() if spec.get("pid", "self") == "self" else os.getppid()
    os.environ["LISTEN_PID"] = str(pid)
    os.environ["LISTEN_FDS"] = str(spec.get("count", len(opened)))
    if "names" in spec:
        os.environ["LISTEN_FDNAMES"] = spec["names"]
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
