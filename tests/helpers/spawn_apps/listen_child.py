"""A Python program started by spawn_with_fds: it adopts its fds with listen_fds().

It first records what it inherited (open fds, LISTEN_PID against its own pid), then takes
the fds by name with the library's ``listen_fds()``, serves one client on ``web`` (a
listening socket) with its report as JSON, and exits 0.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket

opened = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))  # before anything else opens
listen_pid = os.environ.get("LISTEN_PID")
inheritable = {}
for number in opened[3:]:
    with contextlib.suppress(OSError):  # the listing's own directory fd is closed already
        inheritable[number] = os.get_inheritable(number)

from aioancillary import listen_fds  # noqa: E402 - imported after the inventory above

report: dict[str, object] = {
    "pid": os.getpid(),
    "listen_pid": listen_pid,
    "opened": opened,
    "inheritable": inheritable,
}
with listen_fds() as fds:
    report["names"] = fds.names()
    inodes: dict[str, list[int]] = {}
    for name in fds.names():
        if name != "web":
            for owned in fds.take_fds(name):
                with owned:
                    inodes.setdefault(name, []).append(os.fstat(owned.fileno()).st_ino)
    report["inodes"] = inodes
    web = fds.take_socket("web", type=socket.SOCK_STREAM)
report["env_left"] = sorted(k for k in os.environ if k.startswith("LISTEN_"))
with web:
    conn, _ = web.accept()
    with conn:
        conn.sendall(json.dumps(report).encode() + b"\n")
