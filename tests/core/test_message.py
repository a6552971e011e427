"""AncillaryMessage: owns its fds until they are taken; closing closes what is left."""

from __future__ import annotations

import os

import pytest
from helpers import is_open

from aioancillary import AncillaryMessage, OwnedFd
from aioancillary._core._message import new_message, take_raw_fds


def owned(n: int) -> tuple[OwnedFd, ...]:
    return tuple(OwnedFd(os.open(os.devnull, os.O_RDONLY)) for _ in range(n))


def test_defaults() -> None:
    msg = AncillaryMessage(b"abc")
    assert msg.data == b"abc"
    assert msg.fds == ()
    assert msg.discarded_fds == 0
    assert msg.take_fds() == ()


def test_take_fds_moves_ownership() -> None:
    fds = owned(3)
    msg = AncillaryMessage(b"x", fds, discarded_fds=2)
    assert msg.discarded_fds == 2
    taken = msg.take_fds()
    assert taken == fds
    assert msg.fds == ()
    msg.close()  # nothing left to close
    assert all(not fd.closed and is_open(fd.fileno()) for fd in taken)
    for fd in taken:
        fd.close()


def test_take_fd_single() -> None:
    (fd,) = owned(1)
    with AncillaryMessage(b"x", (fd,)) as msg:
        got = msg.take_fd()
        assert got is fd
        assert msg.fds == ()
    assert not got.closed  # taken before the with block ended
    got.close()


@pytest.mark.parametrize("count", [0, 2, 5])
def test_take_fd_wrong_count_takes_nothing(count: int) -> None:
    fds = owned(count)
    with AncillaryMessage(b"x", fds) as msg:
        with pytest.raises(ValueError, match=f"holds {count}"):
            msg.take_fd()
        assert msg.fds == fds  # nothing was taken
        assert not any(fd.closed for fd in fds)
    assert all(fd.closed for fd in fds)


def test_close_closes_untaken_fds() -> None:
    fds = owned(4)
    nums = [fd.fileno() for fd in fds]
    msg = AncillaryMessage(b"x", fds)
    msg.close()
    assert msg.fds == ()
    assert all(fd.closed for fd in fds)
    assert not any(is_open(n) for n in nums)
    msg.close()  # idempotent


def test_context_manager_closes_on_error() -> None:
    fds = owned(2)
    with pytest.raises(RuntimeError), AncillaryMessage(b"x", fds):
        raise RuntimeError("handler failed")
    assert all(fd.closed for fd in fds)


def test_close_continues_after_a_failing_close() -> None:
    fds = owned(3)
    os.close(fds[0].fileno())  # its close() will fail with EBADF
    with AncillaryMessage(b"x", fds):
        pass
    assert all(fd.closed for fd in fds)


def test_repr_shortens_data() -> None:
    (fd,) = owned(1)
    with AncillaryMessage(b"a" * 100, (fd,)) as msg:
        text = repr(msg)
    assert "100 bytes" in text
    assert "fds=1" in text
    assert "a" * 33 not in text


@pytest.mark.parametrize("looked_at", [False, True])
def test_take_raw_fds_hands_over_plain_numbers(looked_at: bool) -> None:
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(3)]
    msg = new_message(b"x", list(fds))
    if looked_at:
        assert [fd.fileno() for fd in msg.fds] == fds  # now held as OwnedFd objects
    assert take_raw_fds(msg) == fds
    assert (msg.fd_count, msg.fds) == (0, ())
    msg.close()  # nothing left: the numbers are the caller's
    assert all(is_open(fd) for fd in fds)
    assert take_raw_fds(msg) == []
    for fd in fds:
        os.close(fd)
