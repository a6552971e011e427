"""Peer credentials: byte decoding per platform (no sockets), simulated kernels, real sockets."""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aioancillary import Credentials
from aioancillary._kernel._peercred import (
    _decode_freebsd,
    _decode_linux,
    _decode_netbsd,
    _decode_openbsd,
    _decode_pid,
    _decode_xucred,
    peer_credentials,
)

ME = Credentials(os.getpid(), os.getuid(), os.getgid())

pids = st.integers(min_value=1, max_value=2**31 - 1)
ids = st.integers(min_value=0, max_value=2**32 - 2)  # (uid_t)-1 is "no id"


# -- byte builders: the structs as each kernel writes them (native layout) ------------------


def ucred(pid: int, uid: int, gid: int) -> bytes:
    return struct.pack("@iII", pid, uid, gid)


def xucred(uid: int, gid: int, *, version: int = 0, ngroups: int = 1) -> bytes:
    """macOS's struct xucred: 76 bytes, 2 bytes of padding after cr_ngroups."""
    groups = [gid, *range(1000, 1015)]
    return struct.pack("@IIh16I", version, uid, ngroups, *groups)


def freebsd_xucred(uid: int, gid: int, pid: int) -> bytes:
    """FreeBSD 13+'s struct xucred: the pid in a pointer-aligned union after cr_groups."""
    head = xucred(uid, gid)
    pointer = struct.calcsize("P")
    padded = head + b"\0" * (-len(head) % pointer)
    union = struct.pack("@i", pid) + b"\0" * (pointer - 4)
    return padded + union


def sockpeercred(uid: int, gid: int, pid: int) -> bytes:
    return struct.pack("@IIi", uid, gid, pid)


def unpcbid(pid: int, uid: int, gid: int) -> bytes:
    return struct.pack("@iII", pid, uid, gid)


# -- pure decoders ----------------------------------------------------------------------------


def test_freebsd_xucred_layout_matches_the_header() -> None:
    # u_int + uid_t + short (+2 pad) + gid_t[16] = 76; the union is pointer-aligned.
    assert len(xucred(1, 2)) == 76
    assert len(freebsd_xucred(1, 2, 3)) == (88 if struct.calcsize("P") == 8 else 80)


@given(pids, ids, ids)
def test_decode_linux(pid: int, uid: int, gid: int) -> None:
    assert _decode_linux(ucred(pid, uid, gid)) == (pid, uid, gid)


@given(ids, ids, pids)
def test_decode_xucred_darwin(uid: int, gid: int, pid: int) -> None:
    assert _decode_xucred(xucred(uid, gid, ngroups=3), pid) == (pid, uid, gid)


@given(ids, ids, pids)
def test_decode_freebsd_with_pid(uid: int, gid: int, pid: int) -> None:
    assert _decode_freebsd(freebsd_xucred(uid, gid, pid)) == (pid, uid, gid)


def test_decode_freebsd_before_cr_pid_reports_unknown_pid() -> None:
    # Before FreeBSD 13 the union was an unused pointer, left zeroed by cru2x().
    assert _decode_freebsd(freebsd_xucred(1001, 1002, 0)) == (-1, 1001, 1002)
    # A kernel that returns only the 76-byte head: no pid at all.
    assert _decode_freebsd(xucred(1001, 1002)) == (-1, 1001, 1002)


@given(ids, ids, pids)
def test_decode_openbsd_order_is_uid_gid_pid(uid: int, gid: int, pid: int) -> None:
    assert _decode_openbsd(sockpeercred(uid, gid, pid)) == (pid, uid, gid)


def test_decode_openbsd_is_not_linux_order() -> None:
    raw = sockpeercred(1001, 1002, 4242)
    assert _decode_openbsd(raw) == Credentials(4242, 1001, 1002)
    assert _decode_linux(raw) != Credentials(4242, 1001, 1002)


@given(pids, ids, ids)
def test_decode_netbsd(pid: int, uid: int, gid: int) -> None:
    assert _decode_netbsd(unpcbid(pid, uid, gid)) == (pid, uid, gid)


def test_decode_pid() -> None:
    assert _decode_pid(struct.pack("@i", 777)) == 777


def test_pid_zero_means_unknown() -> None:
    # Linux reports 0 for a peer outside our pid namespace.
    assert _decode_linux(ucred(0, 5, 6)).pid == -1
    assert _decode_netbsd(unpcbid(0, 5, 6)).pid == -1


@pytest.mark.parametrize(
    ("decode", "raw"),
    [
        (_decode_linux, ucred(1, 2, 3)[:11]),
        (_decode_freebsd, xucred(1, 2)[:75]),
        (_decode_openbsd, b""),
        (_decode_netbsd, b"\0" * 8),
        (_decode_pid, b"\0\0"),
    ],
)
def test_short_buffers_are_refused(decode: Callable[[bytes], object], raw: bytes) -> None:
    with pytest.raises(ValueError, match="need"):
        decode(raw)


def test_xucred_unknown_version_is_refused() -> None:
    with pytest.raises(ValueError, match="cr_version"):
        _decode_xucred(xucred(1, 2, version=1), 3)


def test_xucred_without_groups_is_refused() -> None:
    with pytest.raises(ValueError, match="cr_ngroups"):
        _decode_xucred(xucred(1, 2, ngroups=0), 3)


# -- simulated kernels: a fake socket answers getsockopt with bytes -----------------------


class FakeSocket:
    """Answers ``getsockopt(level, option, buflen)`` from a table; records every call."""

    def __init__(
        self,
        answers: dict[tuple[int, int], bytes | OSError],
        *,
        family: int = socket.AF_UNIX,
        peer: bytes | OSError = b"",
    ) -> None:
        self.family = family
        self._answers = answers
        self._peer = peer
        self.calls: list[tuple[int, int, int]] = []

    def getpeername(self) -> bytes:
        if isinstance(self._peer, OSError):
            raise self._peer
        return self._peer

    def getsockopt(self, level: int, option: int, buflen: int) -> bytes:
        self.calls.append((level, option, buflen))
        answer = self._answers.get((level, option))
        if answer is None:
            raise OSError(errno.ENOPROTOOPT, os.strerror(errno.ENOPROTOOPT))
        if isinstance(answer, OSError):
            raise answer
        return answer[:buflen]  # like the kernel: never more than asked for


def query(fake: FakeSocket, platform_name: str) -> Credentials | None:
    return peer_credentials(cast(socket.socket, fake), platform_name=platform_name)


def oserror(code: int) -> OSError:
    return OSError(code, os.strerror(code))


LINUX_OPT = (socket.SOL_SOCKET, socket.SO_PEERCRED)  # the test machine is Linux
PEERCRED = (0, 0x001)  # SOL_LOCAL, LOCAL_PEERCRED
PEERPID = (0, 0x002)  # SOL_LOCAL, LOCAL_PEERPID
OPENBSD_OPT = (0xFFFF, 0x1022)  # SOL_SOCKET, SO_PEERCRED on OpenBSD
NETBSD_OPT = (0, 0x0003)  # LOCAL_PEEREID


def test_simulated_linux() -> None:
    fake = FakeSocket({LINUX_OPT: ucred(4242, 1001, 1002)})
    assert query(fake, "linux") == (4242, 1001, 1002)
    assert fake.calls == [(*LINUX_OPT, 12)]


def test_simulated_darwin() -> None:
    fake = FakeSocket({PEERCRED: xucred(501, 20, ngroups=4), PEERPID: struct.pack("@i", 4242)})
    assert query(fake, "darwin") == (4242, 501, 20)
    assert fake.calls == [(*PEERCRED, 76), (*PEERPID, 4)]


def test_simulated_darwin_without_local_peerpid() -> None:
    fake = FakeSocket({PEERCRED: xucred(501, 20), PEERPID: oserror(errno.ENOPROTOOPT)})
    assert query(fake, "darwin") == (-1, 501, 20)


@pytest.mark.parametrize("name", ["freebsd", "freebsd14"])
def test_simulated_freebsd(name: str) -> None:
    raw = freebsd_xucred(1001, 1002, 4242)
    fake = FakeSocket({PEERCRED: raw})
    assert query(fake, name) == (4242, 1001, 1002)
    assert fake.calls == [(*PEERCRED, len(raw))]  # asks for the whole struct, union included


def test_simulated_freebsd_12() -> None:
    fake = FakeSocket({PEERCRED: freebsd_xucred(1001, 1002, 0)})
    assert query(fake, "freebsd") == (-1, 1001, 1002)


def test_simulated_openbsd() -> None:
    fake = FakeSocket({OPENBSD_OPT: sockpeercred(1001, 1002, 4242)})
    assert query(fake, "openbsd") == (4242, 1001, 1002)
    assert fake.calls == [(*OPENBSD_OPT, 12)]


def test_simulated_netbsd() -> None:
    fake = FakeSocket({NETBSD_OPT: unpcbid(4242, 1001, 1002)})
    assert query(fake, "netbsd") == (4242, 1001, 1002)
    assert fake.calls == [(*NETBSD_OPT, 12)]


@pytest.mark.parametrize("name", ["darwin", "freebsd", "openbsd", "netbsd"])
@pytest.mark.parametrize("code", [errno.ENOTCONN, errno.EINVAL, errno.ENOPROTOOPT])
def test_simulated_unconnected_is_none(name: str, code: int) -> None:
    err = oserror(code)
    fake = FakeSocket({PEERCRED: err, OPENBSD_OPT: err, NETBSD_OPT: err})
    assert query(fake, name) is None


@pytest.mark.parametrize("name", ["linux", "darwin", "freebsd", "openbsd", "netbsd"])
def test_simulated_other_errors_propagate(name: str) -> None:
    err = oserror(errno.EBADF)
    fake = FakeSocket({LINUX_OPT: err, PEERCRED: err, OPENBSD_OPT: err, NETBSD_OPT: err})
    with pytest.raises(OSError, match=os.strerror(errno.EBADF)) as info:
        query(fake, name)
    assert info.value.errno == errno.EBADF


def test_simulated_linux_listener_is_none() -> None:
    # A Linux listener answers SO_PEERCRED with its own credentials: it must not be asked.
    fake = FakeSocket({LINUX_OPT: ucred(1, 2, 3)}, peer=oserror(errno.ENOTCONN))
    assert query(fake, "linux") is None
    assert fake.calls == []


def test_simulated_no_recorded_credentials_is_none() -> None:
    # Linux's answer for a socket that has a peer but no credentials: (0, -1, -1).
    fake = FakeSocket({LINUX_OPT: ucred(0, 0xFFFFFFFF, 0xFFFFFFFF)})
    assert query(fake, "linux") is None


def test_simulated_unreadable_layout_is_none() -> None:
    assert query(FakeSocket({PEERCRED: xucred(1, 2, version=7)}), "freebsd") is None
    assert query(FakeSocket({NETBSD_OPT: b"\0" * 4}), "netbsd") is None


@pytest.mark.parametrize("name", ["sunos5", "win32", "aix", "dragonfly"])
def test_platform_without_a_mechanism_is_none(name: str) -> None:
    fake = FakeSocket({})
    assert query(fake, name) is None
    assert fake.calls == []


@pytest.mark.parametrize("name", ["linux", "darwin", "freebsd", "openbsd", "netbsd"])
def test_simulated_non_unix_socket_is_none(name: str) -> None:
    fake = FakeSocket({}, family=socket.AF_INET)
    assert query(fake, name) is None
    assert fake.calls == []


# -- real sockets on this kernel --------------------------------------------------------------


@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_SEQPACKET])
def test_socketpair_is_this_process(kind: socket.SocketKind) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, kind)
    with a, b:
        assert peer_credentials(a) == ME
        assert peer_credentials(b) == ME


def test_default_platform_matches_explicit_linux() -> None:
    a, b = socket.socketpair()
    with a, b:
        assert peer_credentials(a) == peer_credentials(a, platform_name="linux") == ME


def test_inet_socket_is_none() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        assert peer_credentials(s) is None


def test_connected_tcp_socket_is_none() -> None:
    with (
        socket.create_server(("127.0.0.1", 0)) as server,
        socket.create_connection(server.getsockname()) as client,
    ):
        conn, _ = server.accept()
        with conn:
            assert peer_credentials(client) is None
            assert peer_credentials(conn) is None


def test_unconnected_and_listening_unix_sockets_are_none(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        assert peer_credentials(s) is None
        s.bind(str(tmp_path / "l"))
        s.listen()
        assert peer_credentials(s) is None  # Linux would report the listener's own creds


def test_connected_datagram_socket_without_credentials_is_none(tmp_path: Path) -> None:
    # connect() on a Linux datagram socket records no credentials: (0, -1, -1).
    path = str(tmp_path / "d")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.connect(path)
            assert peer_credentials(sender) is None
            assert peer_credentials(receiver) is None


def test_credentials_survive_the_peer_closing() -> None:
    a, b = socket.socketpair()
    with a:
        b.close()
        assert peer_credentials(a) == ME


def test_closed_socket_raises() -> None:
    a, b = socket.socketpair()
    b.close()
    a.close()
    with pytest.raises(OSError, match=os.strerror(errno.EBADF)) as info:
        peer_credentials(a)
    assert info.value.errno == errno.EBADF


CHILD = textwrap.dedent(
    """
    import json, os, socket, sys
    from aioancillary._kernel._peercred import peer_credentials

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(sys.argv[1])
        print(json.dumps({"pid": os.getpid(), "seen": peer_credentials(s)}), flush=True)
        sys.stdin.read()  # stay connected until the parent has looked
    """
)


def test_child_process_pid(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen(1)
        with subprocess.Popen(
            [sys.executable, "-c", CHILD, path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        ) as child:
            conn, _ = server.accept()
            with conn:
                seen_here = peer_credentials(conn)
            out, _ = child.communicate(b"", timeout=30)
    assert child.returncode == 0
    report = json.loads(out)
    assert report["pid"] == child.pid
    assert seen_here == (child.pid, os.getuid(), os.getgid())
    # The child sees the listening process: credentials cached at listen() time.
    assert tuple(report["seen"]) == ME
