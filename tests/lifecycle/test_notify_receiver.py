"""notify(fdstore=...): the fds go only to a notification socket another user cannot have bound.

The squatter is a child process that drops to ``nobody`` (``setgroups``/``setgid``/``setuid``:
the tests need root) and binds the ``NOTIFY_SOCKET`` address before the service notifies: an
abstract name (which has no owner, ``unix(7)``), or a socket file in a directory it may write.
It then reports every datagram that reached it and how many fds came with them; it closes
those fds and reports its own fd count before and after.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import within

from aioancillary._lifecycle._notify import NotifyError, notify, notify_async

NOBODY = pwd.getpwnam("nobody")

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="starting a squatter as nobody needs root"
)

# The interpreter's files may not be readable by nobody: the child imports what it needs, then
# drops to nobody, then binds (so that a socket file is nobody's).
SQUATTER = textwrap.dedent(
    f"""
    import array, json, os, socket, sys
    address = sys.argv[1]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    os.setgroups([])
    os.setgid({NOBODY.pw_gid})
    os.setuid({NOBODY.pw_uid})
    before = len(os.listdir("/proc/self/fd"))
    sock.bind("\\0" + address[1:] if address.startswith("@") else address)
    print("bound", flush=True)
    sys.stdin.readline()
    sock.setblocking(False)
    received = []
    while True:
        try:
            data, ancdata, _flags, _addr = sock.recvmsg(4096, socket.CMSG_SPACE(64 * 4))
        except BlockingIOError:
            break
        fds = array.array("i")
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        for fd in fds:
            os.close(fd)
        received.append({{"data": data.decode(), "fds": len(fds)}})
    after = len(os.listdir("/proc/self/fd"))
    sock.close()
    print(json.dumps({{"received": received, "before": before, "after": after}}), flush=True)
    """
)


class Squatter:
    """A process of another user bound to the notification address first."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def report(self) -> list[dict[str, Any]]:
        """Every datagram it received (text and fd count); its fds are all closed."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"report\n")
        out, _ = await within(self.proc.communicate(), 15)
        assert self.proc.returncode == 0
        report = json.loads(out)
        assert report["after"] == report["before"]  # it closed what it received
        received: list[dict[str, Any]] = report["received"]
        return received


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    """A directory nobody may write (tmp_path's parents are root's, mode 0700)."""
    path = Path(tempfile.mkdtemp(prefix="aioancillary-notify-"))
    os.chown(path, NOBODY.pw_uid, NOBODY.pw_gid)
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.fixture
async def squatter_at(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    procs: list[asyncio.subprocess.Process] = []

    async def start(address: str) -> Squatter:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            SQUATTER,
            address,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        procs.append(proc)
        assert proc.stdout is not None
        assert await within(proc.stdout.readline(), 15) == b"bound\n"
        return Squatter(proc)

    try:
        yield start
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


def memfd() -> int:
    fd = os.memfd_create("secret")
    os.write(fd, b"state of the service")
    return fd


async def test_fds_are_never_sent_to_an_abstract_address(squatter_at: Any) -> None:
    address = f"@aioancillary-squat-{os.getpid()}-{time.monotonic_ns()}"
    squatter = await squatter_at(address)
    env = {"NOTIFY_SOCKET": address}
    secret = memfd()
    try:
        with pytest.raises(NotifyError, match="is an abstract address: any local process") as b:
            notify(fdstore=[secret], fdname="state", environ=env)
        with pytest.raises(NotifyError, match="is an abstract address") as nb:
            await within(notify_async(fdstore=[secret], fdname="state", environ=env))
    finally:
        os.close(secret)
    assert "Nothing was sent" in str(b.value)
    assert nb.value.errno is None
    # Notifications without fds still go there.
    assert notify(ready=True, environ=env) is True
    assert await squatter.report() == [{"data": "READY=1", "fds": 0}]


@pytest.mark.parametrize("named_by", ["path", "symlink"])
async def test_fds_go_only_to_a_socket_file_of_root_or_this_user(
    named_by: str, squatter_at: Any, nobody_dir: Path, tmp_path: Path
) -> None:
    path = str(nobody_dir / "notify.sock")
    squatter = await squatter_at(path)
    if named_by == "symlink":  # a link of ours to their socket: the file it reaches counts
        (tmp_path / "notify.sock").symlink_to(path)
        path = str(tmp_path / "notify.sock")
    env = {"NOTIFY_SOCKET": path}
    secret = memfd()
    try:
        with pytest.raises(NotifyError) as blocking:
            notify(fdstore=[secret], fdname="state", environ=env)
        with pytest.raises(NotifyError) as not_blocking:
            await within(notify_async(fdstore=[secret], environ=env))
    finally:
        os.close(secret)
    for info in (blocking, not_blocking):
        assert f"is a socket file of uid {NOBODY.pw_uid}, not of root or of this" in str(info.value)
        assert "Nothing was sent" in str(info.value)
    assert await within(notify_async(status="up", environ=env)) is True  # no fds: delivered
    assert await squatter.report() == [{"data": "STATUS=up", "fds": 0}]
