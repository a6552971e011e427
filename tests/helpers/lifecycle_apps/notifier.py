"""A service process that parks a state file with the supervisor (``FDSTORE=1``).

``notifier.py blocking|asyncio|uvloop``: writes a tag into a memfd, sends it with
``notify(fdstore=..., fdname="state")`` (or ``notify_async`` on the named loop), closes it, and
prints one JSON line: the memfd's inode and the open-fd counts before and after.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

from aioancillary._lifecycle._notify import notify, notify_async


def count() -> int:
    return len(os.listdir("/proc/self/fd"))


async def run_async(fd: int) -> bool:
    return await notify_async(ready=True, fdstore=[fd], fdname="state")


def main() -> None:
    mode = sys.argv[1]
    if mode != "blocking":
        # Create the loop first: its own fds (epoll, self-pipe, libuv's) are not ours to count.
        factory = asyncio.new_event_loop
        if mode == "uvloop":
            import uvloop  # noqa: PLC0415 - only when asked for: the suite also runs without it

            factory = uvloop.new_event_loop
        runner = asyncio.Runner(loop_factory=factory)
        runner.get_loop()
    before = count()
    fd = os.memfd_create("state")
    os.write(fd, f"state of pid {os.getpid()}".encode())
    inode = os.fstat(fd).st_ino
    if mode == "blocking":
        sent = notify(ready=True, fdstore=[fd], fdname="state")
    else:
        sent = runner.run(run_async(fd))
    os.close(fd)
    after = count()
    if mode != "blocking":
        runner.close()
    print(json.dumps({"sent": sent, "inode": inode, "before": before, "after": after}))


if __name__ == "__main__":
    main()
