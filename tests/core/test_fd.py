"""OwnedFd: ownership of one fd, and the borrowed forms accepted when sending. No sockets sent."""

from __future__ import annotations

import errno
import gc
import os
import socket
import stat
import tempfile

import pytest
from helpers import is_open

from aioancillary import InvalidFdError, OwnedFd
from aioancillary._core._fd import close_all, fd_number


def devnull() -> int:
    return os.open(os.devnull, os.O_RDWR)


def test_fileno_and_repr() -> None:
    num = devnull()
    fd = OwnedFd(num)
    assert fd.fileno() == num
    assert not fd.closed
    assert repr(fd) == f"<OwnedFd fd={num}>"
    fd.close()
    assert repr(fd) == "<OwnedFd closed>"


def test_negative_fd_refused() -> None:
    with pytest.raises(InvalidFdError, match="-1"):
        OwnedFd(-1)


def test_close_is_idempotent() -> None:
    num = devnull()
    fd = OwnedFd(num)
    fd.close()
    assert fd.closed
    assert not is_open(num)
    fd.close()  # a second close must not close a reused number
    other = devnull()  # very likely reuses num: it must survive the third close
    fd.close()
    assert is_open(other)
    os.close(other)


def test_fileno_after_close_raises() -> None:
    fd = OwnedFd(devnull())
    fd.close()
    with pytest.raises(ValueError, match="closed"):
        fd.fileno()


def test_detach_gives_up_ownership() -> None:
    num = devnull()
    fd = OwnedFd(num)
    assert fd.detach() == num
    assert fd.closed
    fd.close()  # must not close the detached fd
    del fd
    gc.collect()  # no ResourceWarning, no close: the caller owns it
    assert is_open(num)
    os.close(num)


def test_detach_twice_raises() -> None:
    fd = OwnedFd(devnull())
    os.close(fd.detach())
    with pytest.raises(ValueError, match="closed"):
        fd.detach()


def test_dup_is_a_cloexec_copy_of_the_same_file() -> None:
    num = devnull()
    os.set_inheritable(num, True)
    with OwnedFd(num) as fd, fd.dup() as copy:
        assert copy.fileno() != num
        assert os.path.samestat(os.fstat(copy.fileno()), os.fstat(num))
        assert os.get_inheritable(num)
        assert not os.get_inheritable(copy.fileno())


def test_dup_of_closed_owned_fd_raises() -> None:
    fd = OwnedFd(devnull())
    fd.close()
    with pytest.raises(ValueError, match="closed"):
        fd.dup()


def test_context_manager_closes() -> None:
    num = devnull()
    with OwnedFd(num) as fd:
        assert fd.fileno() == num
    assert fd.closed
    assert not is_open(num)


def test_context_manager_closes_on_error() -> None:
    num = devnull()
    with pytest.raises(RuntimeError), OwnedFd(num):
        raise RuntimeError("boom")
    assert not is_open(num)


@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_SEQPACKET])
def test_into_socket_moves_ownership(kind: socket.SocketKind) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, kind)
    num = a.detach()
    with b:
        fd = OwnedFd(num)
        sock = fd.into_socket()
        with sock:
            assert fd.closed
            assert sock.fileno() == num
            assert sock.family == socket.AF_UNIX
            assert sock.type == kind
            sock.send(b"hi")
            assert b.recv(10) == b"hi"
            fd.close()  # detached: must not close the socket's fd
            assert is_open(num)
    assert not is_open(num)


def test_into_socket_on_non_socket_keeps_ownership() -> None:
    r, w = os.pipe()
    os.close(w)
    fd = OwnedFd(r)
    with pytest.raises(OSError, match="non-socket") as info:
        fd.into_socket()
    assert info.value.errno == errno.ENOTSOCK
    assert not fd.closed
    assert is_open(r)
    fd.close()
    assert not is_open(r)


def test_into_file_moves_ownership() -> None:
    with tempfile.TemporaryFile() as tmp:
        fd = OwnedFd.dup_of(tmp)
        num = fd.fileno()
        with fd.into_file("r+b") as fobj:
            assert fd.closed
            assert fobj.fileno() == num
            fobj.write(b"through the file object")
            fobj.flush()
        assert not is_open(num)
        tmp.seek(0)
        assert tmp.read() == b"through the file object"


def test_into_file_text_mode() -> None:
    r, w = os.pipe()
    with OwnedFd(w).into_file("w", encoding="utf-8") as fobj:
        fobj.write("héllo")
    with OwnedFd(r).into_file("r", encoding="utf-8") as rf:
        assert rf.read() == "héllo"


@pytest.mark.parametrize(
    ("mode", "kwargs", "error"),
    [
        ("r", {"encoding": "no-such-codec"}, LookupError),  # fails after FileIO took the fd
        ("rb", {"encoding": "utf-8"}, ValueError),  # fails before
        ("rt", {"buffering": 0}, ValueError),
        ("q", {}, ValueError),
    ],
)
def test_into_file_bad_arguments_keep_ownership(
    mode: str, kwargs: dict[str, object], error: type[Exception]
) -> None:
    num = devnull()
    fd = OwnedFd(num)
    with pytest.raises(error):
        fd.into_file(mode, **kwargs)  # type: ignore[arg-type]
    assert not fd.closed
    assert is_open(num)  # io.open must not have closed it behind the OwnedFd's back
    fd.close()
    assert not is_open(num)


def test_dup_of_int_and_fileno_objects() -> None:
    num = devnull()
    with OwnedFd.dup_of(num) as from_int:
        assert from_int.fileno() != num
        assert os.path.samestat(os.fstat(from_int.fileno()), os.fstat(num))
        assert not os.get_inheritable(from_int.fileno())
    assert is_open(num)  # borrowed: untouched
    with tempfile.TemporaryFile() as tmp, OwnedFd.dup_of(tmp) as from_file:
        assert os.path.samestat(os.fstat(from_file.fileno()), os.fstat(tmp.fileno()))
    with OwnedFd(num) as owned, OwnedFd.dup_of(owned) as from_owned:
        assert from_owned.fileno() != num


def test_dup_of_invalid_fds() -> None:
    num = devnull()
    os.close(num)
    with pytest.raises(InvalidFdError, match=str(num)):
        OwnedFd.dup_of(num)  # closed number (not reused: nothing opened since)
    with pytest.raises(InvalidFdError):
        OwnedFd.dup_of(-3)
    sock = socket.socket(socket.AF_UNIX)
    sock.close()
    with pytest.raises(InvalidFdError):
        OwnedFd.dup_of(sock)  # fileno() == -1
    with tempfile.TemporaryFile() as tmp:
        pass
    with pytest.raises(InvalidFdError):
        OwnedFd.dup_of(tmp)  # closed: fileno() raises ValueError


def test_gc_closes_and_warns_naming_the_fd() -> None:
    num = devnull()
    fd = OwnedFd(num)
    with pytest.warns(ResourceWarning, match=rf"unclosed OwnedFd fd={num}\b"):
        del fd  # the last reference: collected at once
    # Checked at once, before anything can reuse the number.
    assert not is_open(num)


def test_gc_in_reference_cycle_closes() -> None:
    num = devnull()
    gc.disable()  # only the explicit collection below may find the cycle
    try:
        holder: list[object] = [OwnedFd(num)]
        holder.append(holder)
        del holder
        assert is_open(num)  # unreachable, not yet collected
        with pytest.warns(ResourceWarning, match=rf"unclosed OwnedFd fd={num}\b"):
            gc.collect()
    finally:
        gc.enable()
    assert not is_open(num)


def test_gc_after_close_or_detach_is_silent() -> None:
    # ResourceWarning is an error in this suite: a spurious warning fails the test.
    fd = OwnedFd(devnull())
    fd.close()
    del fd
    num = devnull()
    fd2 = OwnedFd(num)
    fd2.detach()
    del fd2
    gc.collect()
    assert is_open(num)
    os.close(num)


def test_fd_number() -> None:
    num = devnull()
    with OwnedFd(num) as owned:
        assert fd_number(num) == num
        assert fd_number(owned) == num
    with pytest.raises(InvalidFdError):
        fd_number(-1)
    with pytest.raises(InvalidFdError):
        fd_number(owned)  # closed OwnedFd: fileno() raises ValueError


def test_close_all_closes_every_fd_even_if_one_fails() -> None:
    nums = [devnull() for _ in range(3)]
    fds = [OwnedFd(n) for n in nums]
    os.close(nums[0])  # closing fds[0] will fail with EBADF
    close_all(fds)
    assert all(fd.closed for fd in fds)
    assert not any(is_open(n) for n in nums[1:])


def test_owned_fd_of_a_directory_and_regular_file() -> None:
    with tempfile.TemporaryDirectory() as d:
        dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        with OwnedFd(dfd) as fd:
            assert stat.S_ISDIR(os.fstat(fd.fileno()).st_mode)
        assert not is_open(dfd)
