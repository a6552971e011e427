"""EMFILE on receive: the kernel drops what does not fit, the rest is closed, the socket lives on.

Each case runs in a child process: it lowers RLIMIT_NOFILE, which must not touch the test
runner, and reports what it saw as JSON on stdout.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

import pytest

CHILD = textwrap.dedent(
    """
    import json, os, resource, socket, sys
    from aioancillary import FdTruncatedError, recv_fds, recv_fds_into, send_fds

    def count():
        return len(os.listdir("/proc/self/fd")) - 1

    kind, helper = sys.argv[1], sys.argv[2]
    a, b = socket.socketpair(socket.AF_UNIX, getattr(socket, kind))
    keep = os.open(os.devnull, os.O_RDONLY)
    send_fds(a, b"first", [keep] * 20)
    send_fds(a, b"second", [keep])

    baseline = count()
    highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    # Numbers below the limit that are free: holes plus 3 above the highest open fd.
    limit = highest + 4
    room = limit - baseline
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))

    out = {"baseline": baseline, "room": room}
    try:
        if helper == "recv_fds":
            recv_fds(b, 64, 64)
        else:
            recv_fds_into(b, bytearray(64), 64)
    except FdTruncatedError as exc:
        out["error"] = str(exc)
        out["closed"] = exc.closed_fds
        out["data"] = exc.data.decode()
    out["after"] = count()
    with recv_fds(b, 64, 4) as msg:
        out["second"] = msg.data.decode()
        out["second_fds"] = len(msg.fds)
        out["same_file"] = os.path.samestat(os.fstat(msg.fds[0].fileno()), os.fstat(keep))
        out["cloexec"] = not os.get_inheritable(msg.fds[0].fileno())
    out["end"] = count()
    a.close()
    b.close()
    os.close(keep)
    print(json.dumps(out))
    """
)


def run_child(kind: str, helper: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-c", CHILD, kind, helper],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


@pytest.mark.parametrize("kind", ["SOCK_STREAM", "SOCK_SEQPACKET", "SOCK_DGRAM"])
@pytest.mark.parametrize("helper", ["recv_fds", "recv_fds_into"])
def test_emfile_truncates_closes_and_recovers(kind: str, helper: str) -> None:
    out = run_child(kind, helper)
    assert 3 <= out["room"] < 20  # the message really did not fit
    # The kernel installed as many fds as fit, set MSG_CTRUNC, and recvmsg succeeded.
    assert "MSG_CTRUNC" in out["error"]
    assert out["closed"] == out["room"]
    assert out["data"] == "first"  # the bytes are kept for a framing layer
    assert out["after"] == out["baseline"]  # every fd that arrived was closed
    # The socket is still usable, at the same (low) limit.
    assert out["second"] == "second"
    assert out["second_fds"] == 1
    assert out["same_file"]
    assert out["cloexec"]
    assert out["end"] == out["baseline"]
