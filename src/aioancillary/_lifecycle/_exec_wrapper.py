"""The exec wrapper of ``spawn_with_fds``: take the named fds, put them at 3, 4, ..., exec.

``python -I -S _exec_wrapper.py ADDRESS COUNT PROGRAM [ARG...]`` is what
``spawn_with_fds`` starts. This process:

1. connects to ``ADDRESS`` (a ``SOCK_SEQPACKET`` socket of the parent; ``@name`` is an
   abstract one) and checks, on Linux, that the parent listens there (``SO_PEERCRED``);
2. receives ``COUNT`` fds (``SCM_RIGHTS``, 253 per message at most, close-on-exec);
3. places them at 3, 4, ... (``SD_LISTEN_FDS_START``), inheritable, and closes every other
   fd above 2, so that the program inherits nothing else, whatever the event loop's spawn
   left open;
4. sets ``LISTEN_PID`` to its own pid (``sd_listen_fds(3)`` compares it with ``getpid()``;
   ``exec`` keeps the pid) and execs ``PROGRAM``. ``LISTEN_FDS`` and ``LISTEN_FDNAMES`` come
   from the parent in the environment.

If exec fails, the errno goes back to the parent (``E<errno> <reason>``) and the wrapper exits
with status 127. It runs with ``-I -S`` (no site-packages, no ``PYTHON*`` variables), so it
imports the standard library only.
"""

from __future__ import annotations

import array
import fcntl
import os
import resource
import socket
import struct
import sys

SD_LISTEN_FDS_START = 3
SCM_MAX_FD = 253
_INT = array.array("i").itemsize


def fail(message: str) -> int:
    print(f"aioancillary exec wrapper: {message}", file=sys.stderr, flush=True)
    return 127


def check_parent(sock: socket.socket) -> str | None:
    """Why the peer is not our parent, or None (checked where the kernel says, on Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, _uid, _gid = struct.unpack("3i", creds)
    if pid != os.getppid():
        return f"the socket belongs to pid {pid}, not to the parent {os.getppid()}"
    return None


def receive(sock: socket.socket, count: int) -> list[int]:
    """``count`` fds from the parent (close-on-exec); raise ``OSError`` if they do not come
    (the fds that did are closed then)."""
    fds: list[int] = []
    flags = getattr(socket, "MSG_CMSG_CLOEXEC", 0)
    try:
        while len(fds) < count:
            data, ancdata, msg_flags, _ = sock.recvmsg(
                16, socket.CMSG_SPACE(SCM_MAX_FD * _INT), flags
            )
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    got = array.array("i")
                    got.frombytes(payload[: len(payload) - len(payload) % _INT])
                    fds.extend(got)
            if msg_flags & socket.MSG_CTRUNC:
                raise OSError("fds were dropped on the way (MSG_CTRUNC): RLIMIT_NOFILE too low?")
            if not data and not ancdata:
                raise OSError(f"the parent went away after {len(fds)} of {count} fds")
        if not flags:
            for fd in fds:
                fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.FD_CLOEXEC)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def others(keep: int, low: int) -> list[int]:
    """Open fds from ``low`` up, except ``keep``."""
    try:
        found = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        found = list(range(low, soft if soft != resource.RLIM_INFINITY else 65536))
    return [fd for fd in found if fd >= low and fd != keep]


def place(fds: list[int], ctl: int) -> int:
    """Put ``fds`` at 3, 4, ...; close everything else above 2 but ``ctl``; return ``ctl``."""
    top = SD_LISTEN_FDS_START + len(fds)
    # First move every fd (and the control socket) above the target range: placing fd i at
    # 3 + i must never overwrite one not yet placed.
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, top) for fd in fds]
    ctl_high = fcntl.fcntl(ctl, fcntl.F_DUPFD_CLOEXEC, top)
    for fd in (*fds, ctl):
        os.close(fd)
    for index, fd in enumerate(high):
        os.dup2(fd, SD_LISTEN_FDS_START + index, inheritable=True)
    for fd in others(ctl_high, top):
        try:  # noqa: SIM105 - the standard library only: no contextlib import needed
            os.close(fd)
        except OSError:
            pass  # the listing's own directory fd, already closed
    return ctl_high


def main(argv: list[str]) -> int:
    if len(argv) < 3 or not argv[1].isdigit():
        return fail("usage: _exec_wrapper.py ADDRESS COUNT PROGRAM [ARG...]")
    address = "\0" + argv[0][1:] if argv[0].startswith("@") else argv[0]
    count, program = int(argv[1]), argv[2:]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.connect(address)
        reason = check_parent(sock)
        if reason is not None:
            sock.close()
            return fail(reason)
        fds = receive(sock, count)
    except OSError as exc:
        sock.close()
        return fail(f"cannot get the fds from the parent: {exc}")
    ctl = place(fds, sock.detach())
    os.environ["LISTEN_PID"] = str(os.getpid())
    try:
        os.execvp(program[0], program)
    except OSError as exc:
        report = f"E{exc.errno or 0} {exc.strerror or exc}".encode()
        try:  # noqa: SIM105
            os.write(ctl, report)
        except OSError:
            pass  # the parent is gone: the exit status says it all
        return 127
    return 127  # not reached: execvp returns only by raising


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
