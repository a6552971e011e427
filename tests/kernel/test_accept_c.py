"""The C accept burst (``_speedups.accept_into``) against ``accept_burst`` on ``sock._accept``,
and the C hand-off encoders against ``_handoff._wire``'s.

Every burst case runs both implementations on real listeners with the same assertions: an
empty queue, the limit, the kinds of failure (EMFILE at a lowered RLIMIT_NOFILE and a burst
of nothing but transient errors, each in a child process), a listener shut down underneath,
and the fds: each accepted one is the caller's, close-on-exec, and no other stays open (the
suite's fd check runs around every test).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import platform
import socket
import struct
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.speedups import call_failing, fd_table, require_extension
from hypothesis import given
from hypothesis import strategies as st

from aioancillary._handoff import _wire as wire
from aioancillary._kernel._accept import (
    AcceptErrorKind,
    AcceptFailure,
    accept_burst,
    accepted_kind,
    sockets_of,
)

#: A burst: (listener, limit, into) -> failure; ``into`` gets one entry per client.
Burst = Callable[[socket.socket, int, list[Any]], AcceptFailure | None]


def py_burst(listener: socket.socket, limit: int, into: list[Any]) -> AcceptFailure | None:
    return accept_burst(listener._accept, limit, into, listener.fileno())  # type: ignore[attr-defined]


def c_burst(listener: socket.socket, limit: int, into: list[Any]) -> AcceptFailure | None:
    failure: AcceptFailure | None = require_extension().accept_into(
        listener.fileno(), limit, into, None
    )
    return failure


def c_items_burst(listener: socket.socket, limit: int, into: list[Any]) -> AcceptFailure | None:
    failure: AcceptFailure | None = require_extension().accept_into(
        listener.fileno(), limit, into, b"\x01\x02"
    )
    return failure


def fds_of(into: list[Any]) -> list[int]:
    """The accepted fds, whatever form the burst gave them in."""
    fds = []
    for entry in into:
        if isinstance(entry, int):
            fds.append(entry)
        elif isinstance(entry[0], int):  # (fd, address): the Python burst
            fds.append(entry[0])
        else:  # (record, fd): the C burst's hand-off items
            fds.append(entry[1])
    return fds


@pytest.fixture(params=["py", "c", "c-items"])
def burst(request: pytest.FixtureRequest) -> Burst:
    return {"py": py_burst, "c": c_burst, "c-items": c_items_burst}[request.param]


@pytest.fixture
def accepted() -> Iterator[list[Any]]:
    """The burst's ``into``: every fd in it is closed after the test (they are the caller's)."""
    into: list[Any] = []
    yield into
    for fd in fds_of(into):
        os.close(fd)


@pytest.fixture
def tcp_listener() -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0), backlog=64) as listener:
        listener.setblocking(False)
        yield listener


def test_an_empty_queue_is_no_failure(
    burst: Burst, tcp_listener: socket.socket, accepted: list[Any]
) -> None:
    assert burst(tcp_listener, 8, accepted) is None
    assert accepted == []


def test_the_burst_stops_at_its_limit_then_at_eagain(
    burst: Burst, tcp_listener: socket.socket, accepted: list[Any]
) -> None:
    clients = [socket.create_connection(tcp_listener.getsockname()) for _ in range(3)]
    try:
        assert burst(tcp_listener, 2, accepted) is None
        assert len(accepted) == 2
        assert burst(tcp_listener, 64, accepted) is None
        assert len(accepted) == 3
        assert burst(tcp_listener, 64, accepted) is None
        assert len(accepted) == 3
        assert burst(tcp_listener, 0, accepted) is None  # a limit of 0 tries nothing
        peers = set()
        for fd in fds_of(accepted):
            # Never inherited by a child process (accept4 with SOCK_CLOEXEC on both paths).
            assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
            with socket.socket(fileno=os.dup(fd)) as sock:
                peers.add(sock.getpeername())
        assert peers == {client.getsockname() for client in clients}
    finally:
        for client in clients:
            client.close()


def test_the_c_burst_hands_out_nonblocking_sockets(
    tcp_listener: socket.socket, accepted: list[Any]
) -> None:
    with socket.create_connection(tcp_listener.getsockname()):
        assert c_burst(tcp_listener, 8, accepted) is None
        (fd,) = accepted
        assert os.get_blocking(fd) is False  # as every user of it makes it


def test_a_tcp_listener_shut_down_fails_for_good(
    burst: Burst, tcp_listener: socket.socket, accepted: list[Any]
) -> None:
    # shutdown() on a listening TCP socket disconnects it: accept() fails with EINVAL.
    tcp_listener.shutdown(socket.SHUT_RD)
    for _ in range(2):
        failure = burst(tcp_listener, 8, accepted)
        assert failure is not None
        assert failure.kind is AcceptErrorKind.FATAL
        assert failure.error.errno == errno.EINVAL
        assert type(failure.error) is OSError
    assert accepted == []


@pytest.mark.parametrize("how", [socket.SHUT_RDWR, socket.SHUT_RD], ids=["SHUT_RDWR", "SHUT_RD"])
def test_a_unix_listener_shut_down_underneath_is_fatal(
    burst: Burst, tmp_path: Path, how: int, accepted: list[Any]
) -> None:
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(tmp_path / "l.sock"))
        listener.listen()
        listener.setblocking(False)
        assert burst(listener, 8, accepted) is None  # empty, not shut down: no failure
        listener.shutdown(how)
        failure = burst(listener, 8, accepted)
        assert failure is not None
        assert failure.kind is AcceptErrorKind.FATAL
        assert failure.error.errno == errno.ESHUTDOWN
        assert str(failure.error) == "[Errno 108] the listening socket was shut down"
        assert accepted == []


# -- in a child process: RLIMIT_NOFILE lowered, accept4 failing for every client ---------------

CHILD = textwrap.dedent(
    """
    import ctypes, json, os, resource, socket, struct, sys
    from aioancillary._kernel._accept import accept_burst

    which, case = sys.argv[1], sys.argv[2]
    if which != "py":  # the Python burst must not need the extension
        from aioancillary._kernel import _speedups
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    clients = [socket.create_connection(listener.getsockname()) for _ in range(2)]

    def burst(into, limit=4):
        if which == "py":
            return accept_burst(listener._accept, limit, into, listener.fileno())
        return _speedups.accept_into(listener.fileno(), limit, into, None)

    def count():
        return len(os.listdir("/proc/self/fd")) - 1

    def fds(into):
        return [entry if isinstance(entry, int) else entry[0] for entry in into]

    if case == "emfile":
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        before = count()
        resource.setrlimit(resource.RLIMIT_NOFILE, (before, hard))  # not one fd more
        into = []
        failure = burst(into)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        opened = count() - before
        later = []
        burst(later)  # the clients waited in the backlog
        result = {"kind": failure.kind.value, "errno": failure.error.errno,
                  "type": type(failure.error).__name__, "into": len(into), "opened": opened,
                  "later": len(later)}
        for fd in fds(later):
            os.close(fd)
    else:
        # A seccomp filter failing every accept4 with EPERM (a transient errno): the burst
        # is nothing but transient errors, which is a resource failure.
        nr = int(sys.argv[3])
        BPF_LD_W_ABS, BPF_JEQ_K, BPF_RET_K = 0x20, 0x15, 0x06
        RET_ERRNO, RET_ALLOW = 0x00050000, 0x7FFF0000
        insns = [(BPF_LD_W_ABS, 0, 0, 0), (BPF_JEQ_K, 0, 1, nr),
                 (BPF_RET_K, 0, 0, RET_ERRNO | 1), (BPF_RET_K, 0, 0, RET_ALLOW)]
        code = b"".join(struct.pack("=HBBI", *insn) for insn in insns)
        buf = ctypes.create_string_buffer(code, len(code))
        class Prog(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
        prog = Prog(len(insns), ctypes.addressof(buf))
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
        assert libc.prctl(22, 2, ctypes.byref(prog), 0, 0) == 0, ctypes.get_errno()
        into = []
        failure = burst(into)
        result = {"kind": failure.kind.value, "errno": failure.error.errno,
                  "type": type(failure.error).__name__, "into": len(into)}
    print(json.dumps(result))
    """
)

#: accept4's syscall number, for the seccomp filter.
ACCEPT4 = {"x86_64": 288, "aarch64": 242}


def run_child(which: str, case: str, *extra: str) -> dict[str, Any]:
    if which == "c":
        require_extension()
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, which, case, *extra],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


@pytest.mark.parametrize("which", ["py", "c"])
def test_emfile_ends_the_burst_as_a_resource_failure(which: str) -> None:
    result = run_child(which, "emfile")
    assert result == {
        "kind": "resource",
        "errno": errno.EMFILE,
        "type": "OSError",
        "into": 0,
        "opened": 0,  # nothing was left open by the failed try
        "later": 2,  # the clients stayed in the backlog
    }


@pytest.mark.parametrize("which", ["py", "c"])
def test_a_burst_of_nothing_but_transient_errors_is_a_resource_failure(which: str) -> None:
    nr = ACCEPT4.get(platform.machine())
    if nr is None or not sys.platform.startswith("linux"):
        pytest.skip(f"the accept4 syscall number is not known here ({platform.machine()})")
    result = run_child(which, "seccomp", str(nr))
    assert result == {
        "kind": "resource",
        "errno": errno.EPERM,
        "type": "PermissionError",
        "into": 0,
    }


# -- the records: the C encoder against _wire's ---------------------------------------------------


def sockaddr_in(host: bytes, port: int) -> bytes:
    return struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + host + bytes(8)


def sockaddr_in6(host: bytes, port: int, flowinfo: int, scope_id: int) -> bytes:
    # The scope id is in host order (CPython's makesockaddr reports it as it is).
    head = struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", port, flowinfo)
    return head + host + struct.pack("=I", scope_id)


def sockaddr_un(path: bytes, terminated: bool) -> bytes:
    return struct.pack("=H", socket.AF_UNIX) + path + (b"\0" if terminated else b"")


def python_address(family: int, raw: bytes) -> Any:
    """What socket.accept() returns for the sockaddr ``raw`` (CPython's makesockaddr)."""
    if family == socket.AF_INET:
        port = struct.unpack("!H", raw[2:4])[0]
        return (socket.inet_ntoa(raw[4:8]), port)
    if family == socket.AF_INET6:
        port, flowinfo = struct.unpack("!HI", raw[2:8])
        (scope_id,) = struct.unpack("=I", raw[24:28])
        return (socket.inet_ntop(socket.AF_INET6, raw[8:24]), port, flowinfo, scope_id)
    path = raw[2:]
    if path[:1] == b"\0":
        return path  # a Linux abstract name: bytes
    return os.fsdecode(path.split(b"\0", 1)[0])  # a path (empty: unnamed), as a str


ports = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
paths = st.binary(min_size=1, max_size=107).filter(lambda p: b"\0" not in p)
sockaddrs = st.one_of(
    st.builds(sockaddr_in, st.binary(min_size=4, max_size=4), ports).map(
        lambda raw: (socket.AF_INET, raw)
    ),
    st.builds(sockaddr_in6, st.binary(min_size=16, max_size=16), ports, u32, u32).map(
        lambda raw: (socket.AF_INET6, raw)
    ),
    st.builds(sockaddr_un, paths, st.just(True)).map(lambda raw: (socket.AF_UNIX, raw)),
    # Abstract names: a NUL, then any bytes (NULs too), the length says where it ends.
    st.builds(sockaddr_un, st.binary(max_size=107).map(lambda n: b"\0" + n), st.just(False)).map(
        lambda raw: (socket.AF_UNIX, raw)
    ),
    st.just((socket.AF_UNIX, sockaddr_un(b"", False))),  # an unnamed client
)


@given(sockaddrs, st.integers(0, wire.MAX_LISTENERS))
def test_the_c_record_is_byte_for_byte_the_python_one(
    family_raw: tuple[int, bytes], index: int
) -> None:
    speedups = require_extension()
    family, raw = family_raw
    expected = wire.record_packer(index, family)(python_address(family, raw))
    assert speedups.client_record(wire.record_prefix(index), raw) == expected
    # And the worker reads it back as the address accept() returned.
    ((lid, packed),) = wire.client_records(b"C" + expected)
    assert lid == index
    assert wire.decode_address(family, packed) == python_address(family, raw)


def test_the_c_record_refuses_other_families() -> None:
    speedups = require_extension()
    with pytest.raises(ValueError, match="family"):
        speedups.client_record(b"\0\0", struct.pack("=H", socket.AF_PACKET) + bytes(16))
    with pytest.raises(ValueError, match="sockaddr"):
        speedups.client_record(b"\0\0", b"\1")


def real_clients(tmp_path: Path) -> Iterator[tuple[socket.socket, list[socket.socket]]]:
    """Listeners of every family with a queued client each (named, abstract, unnamed...)."""
    v4 = socket.create_server(("127.0.0.1", 0))
    yield v4, [socket.create_connection(v4.getsockname())]
    if socket.has_ipv6:
        try:
            v6 = socket.create_server(("::1", 0), family=socket.AF_INET6)
        except OSError:
            pass
        else:
            yield v6, [socket.create_connection(v6.getsockname()[:2])]
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(tmp_path / "l.sock"))
    unix.listen()
    unnamed = socket.socket(socket.AF_UNIX)
    unnamed.connect(str(tmp_path / "l.sock"))
    named = socket.socket(socket.AF_UNIX)
    named.bind(str(tmp_path / "c.sock"))
    named.connect(str(tmp_path / "l.sock"))
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind(b"\0aioancillary-test-client-" + str(os.getpid()).encode())
    abstract.connect(str(tmp_path / "l.sock"))
    yield unix, [unnamed, named, abstract]


def test_real_clients_get_the_same_records_on_both_paths(tmp_path: Path) -> None:
    speedups = require_extension()
    for listener, clients in real_clients(tmp_path):
        with listener:
            listener.setblocking(False)
            items: list[tuple[bytes, int]] = []
            try:
                assert speedups.accept_into(listener.fileno(), 8, items, b"\0\5") is None
                assert len(items) == len(clients)
                pack = wire.record_packer(5, listener.family)
                for (record, fd), client in zip(items, clients, strict=True):
                    # What the Python path would have packed: the address accept() reports
                    # for this client (its name as the peer sees it).
                    with socket.socket(fileno=os.dup(fd)) as sock:
                        assert sock.getpeername() == client.getsockname()
                    assert record == pack(client.getsockname())
            finally:
                for _record, fd in items:
                    os.close(fd)
                for client in clients:
                    client.close()


# -- the batch and its fds ---------------------------------------------------------------------


def test_client_batch_is_the_python_message_and_fds() -> None:
    speedups = require_extension()
    items = [(b"\0\1\6" + bytes(6), 40), (b"\0\2\1s", 41), (b"\0\2\3b\0x", 7)]
    data, fds = speedups.client_batch(items)
    assert data == wire.client_message(record for record, _fd in items)
    assert fds == [40, 41, 7]
    assert speedups.client_batch([]) == (b"C", [])
    for bad in ([(b"x", "3")], [(b"x",)], [("x", 3)], [(b"x", -1)], ((b"x", 3),)):
        with pytest.raises((TypeError, ValueError)):
            speedups.client_batch(bad)


@pytest.mark.parametrize("layout", ["run", "gaps", "unordered", "one"])
def test_close_item_fds_closes_those_fds_and_no_other(layout: str) -> None:
    speedups = require_extension()
    opened = [os.open(os.devnull, os.O_RDONLY) for _ in range(12)]
    ordered = sorted(opened)
    chosen = {
        "run": ordered[2:9],
        "gaps": ordered[::2],
        "unordered": [ordered[5], ordered[1], ordered[2], ordered[9], ordered[0]],
        "one": [ordered[3]],
    }[layout]
    try:
        speedups.close_item_fds([(b"", fd) for fd in chosen])
        for fd in opened:
            try:
                os.fstat(fd)
            except OSError:
                assert fd in chosen
            else:
                assert fd not in chosen
    finally:
        for fd in opened:
            if fd not in chosen:
                os.close(fd)


# -- the sockets the servers make of the C burst's fds ---------------------------------------------


def test_sockets_of_makes_nonblocking_sockets_of_the_listeners_kind(
    tcp_listener: socket.socket, accepted: list[Any]
) -> None:
    kind = accepted_kind(tcp_listener)
    assert kind is not None
    with socket.create_connection(tcp_listener.getsockname()) as client:
        assert c_burst(tcp_listener, 8, accepted) is None
        (sock,) = sockets_of(accepted, kind)
        accepted.clear()  # the socket object owns the fd now
        with sock:
            assert (sock.family, sock.type, sock.proto) == (
                tcp_listener.family,
                tcp_listener.type,
                tcp_listener.proto,
            )
            assert sock.gettimeout() == 0.0  # the object knows its fd is non-blocking
            assert sock.getpeername() == client.getsockname()


def test_sockets_of_closes_every_fd_when_one_cannot_be_wrapped() -> None:
    a, b = socket.socketpair()
    with a, b:
        fds = [os.dup(a.fileno()), -5, os.dup(b.fileno())]
        kind = accepted_kind(a)
        assert kind is not None
        with pytest.raises(ValueError, match="negative file descriptor"):
            sockets_of(fds, kind)
        for fd in (fds[0], fds[2]):
            with pytest.raises(OSError, match="Bad file descriptor") as caught:
                os.fstat(fd)
            assert caught.value.errno == errno.EBADF


def test_a_socket_subclass_keeps_its_own_accept() -> None:
    class Listener(socket.socket):
        pass

    with Listener() as sub, socket.socket() as plain:
        assert accepted_kind(sub) is None
        assert accepted_kind(plain) is not None


# -- MemoryError at every allocation: every accepted fd is the caller's or closed -------------


@pytest.mark.parametrize("prefix", [None, b"\x00\x07"], ids=["fds", "items"])
def test_the_c_burst_leaks_no_fd_on_memory_error_anywhere(
    prefix: bytes | None, tcp_listener: socket.socket
) -> None:
    speedups = require_extension()
    failed = 0
    for count in range(0, 40):
        clients = [socket.create_connection(tcp_listener.getsockname()) for _ in range(3)]
        try:
            before = fd_table()
            into: list[Any] = []
            try:
                call_failing(count, speedups.accept_into, tcp_listener.fileno(), 8, into, prefix)
            except MemoryError:
                failed += 1
            held = set(fds_of(into))
            # An fd accepted is in `into` (the caller's) or was closed at once: never both,
            # never neither.
            assert fd_table() - before == held
            for fd in held:
                os.close(fd)
            # What the failed burst did not take is still queued for the next one.
            rest: list[Any] = []
            assert speedups.accept_into(tcp_listener.fileno(), 8, rest, prefix) is None
            for fd in fds_of(rest):
                os.close(fd)
            assert len(into) + len(rest) <= 3
        finally:
            for client in clients:
                client.close()
    assert failed  # the injected failures did reach the burst
