"""The accept burst and the classification of accept errors shared by every accept loop."""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aioancillary._kernel._accept import (
    RESOURCE_ERRNOS,
    TRANSIENT_ERRNOS,
    AcceptErrorKind,
    AcceptFailure,
    ResourcePause,
    accept_burst,
    classify_accept_error,
)
from aioancillary._kernel._unix import listener_shut_down

EAGAIN = "eagain"


def scripted(outcomes: list[int | str]) -> tuple[Callable[[], int], list[int]]:
    """An ``accept`` that returns the ints and raises the errnos (``EAGAIN`` once drained)."""
    calls: list[int] = []
    it: Iterator[int | str] = iter(outcomes)

    def accept() -> int:
        calls.append(1)
        outcome = next(it, EAGAIN)
        if outcome == EAGAIN:
            raise BlockingIOError(errno.EAGAIN, "drained")
        if isinstance(outcome, str):
            raise OSError(getattr(errno, outcome), outcome)
        return outcome

    return accept, calls


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("ECONNABORTED", AcceptErrorKind.TRANSIENT),
        ("EPROTO", AcceptErrorKind.TRANSIENT),
        ("EPERM", AcceptErrorKind.TRANSIENT),
        ("EINTR", AcceptErrorKind.TRANSIENT),
        ("ENETUNREACH", AcceptErrorKind.TRANSIENT),
        ("EMFILE", AcceptErrorKind.RESOURCE),
        ("ENFILE", AcceptErrorKind.RESOURCE),
        ("ENOBUFS", AcceptErrorKind.RESOURCE),
        ("ENOMEM", AcceptErrorKind.RESOURCE),
        ("EINVAL", AcceptErrorKind.FATAL),
        ("EBADF", AcceptErrorKind.FATAL),
        ("ENOTSOCK", AcceptErrorKind.FATAL),
        ("EFAULT", AcceptErrorKind.FATAL),
    ],
)
def test_classification(name: str, kind: AcceptErrorKind) -> None:
    assert classify_accept_error(OSError(getattr(errno, name), name)) is kind


def test_unknown_and_missing_errnos_are_fatal() -> None:
    assert classify_accept_error(OSError(99999, "made up")) is AcceptErrorKind.FATAL
    assert classify_accept_error(OSError("no errno")) is AcceptErrorKind.FATAL
    assert not TRANSIENT_ERRNOS & RESOURCE_ERRNOS


def test_burst_stops_at_eagain_and_at_its_limit() -> None:
    accept, calls = scripted([3, 4, 5])
    got: list[int] = []
    assert accept_burst(accept, 64, got) is None
    assert (got, len(calls)) == ([3, 4, 5], 4)

    accept, calls = scripted(list(range(10)))
    got = []
    assert accept_burst(accept, 4, got) is None
    assert (got, len(calls)) == ([0, 1, 2, 3], 4)

    accept, calls = scripted([1])
    assert accept_burst(accept, 0, got) is None
    assert calls == []


def test_transient_errors_skip_their_client() -> None:
    accept, _calls = scripted([3, "ECONNABORTED", 4, "EPROTO", "EPERM", 5])
    got: list[int] = []
    assert accept_burst(accept, 64, got) is None
    assert got == [3, 4, 5]


@pytest.mark.parametrize(
    ("name", "kind"), [("EMFILE", AcceptErrorKind.RESOURCE), ("EINVAL", AcceptErrorKind.FATAL)]
)
def test_a_resource_or_fatal_error_ends_the_burst_keeping_what_came_before(
    name: str, kind: AcceptErrorKind
) -> None:
    accept, calls = scripted([3, 4, name, 5])
    got: list[int] = []
    failure = accept_burst(accept, 64, got)
    assert isinstance(failure, AcceptFailure)
    assert failure.kind is kind
    assert failure.error.errno == getattr(errno, name)
    assert (got, len(calls)) == ([3, 4], 3)


def test_a_burst_of_nothing_but_transient_errors_pauses() -> None:
    # The same "transient" error on every try is not about one client: pause, do not spin.
    accept, _calls = scripted(["EPERM"] * 100)
    got: list[int] = []
    failure = accept_burst(accept, 8, got)
    assert failure is not None
    assert failure.kind is AcceptErrorKind.RESOURCE
    assert failure.error.errno == errno.EPERM
    # One success in the burst: the errors were about clients.
    accept, _calls = scripted(["EPERM"] * 7 + [9])
    assert accept_burst(accept, 8, got) is None
    assert got == [9]


@given(
    st.lists(
        st.one_of(
            st.integers(0, 1000),
            st.sampled_from(["ECONNABORTED", "EPROTO", "EMFILE", "ENOMEM", "EINVAL", EAGAIN]),
        ),
        max_size=40,
    ),
    st.integers(1, 20),
)
def test_burst_model(outcomes: list[int | str], limit: int) -> None:
    accept, calls = scripted(outcomes)
    got: list[int] = []
    failure = accept_burst(accept, limit, got)
    assert len(calls) <= limit
    tried = outcomes[: len(calls)] + [EAGAIN] * (len(calls) - len(outcomes))
    assert got == [o for o in tried if isinstance(o, int)]
    last = tried[-1] if tried else None
    if failure is None:
        assert last == EAGAIN or len(calls) == limit or not calls
        assert last not in ("EMFILE", "ENOMEM", "EINVAL")
    elif failure.kind is AcceptErrorKind.FATAL:
        assert last == "EINVAL"
    elif last in ("EMFILE", "ENOMEM"):
        assert failure.error.errno == getattr(errno, str(last))
    else:  # every try of the burst failed with a transient error
        assert len(calls) == limit
        assert all(o in ("ECONNABORTED", "EPROTO") for o in tried)


def test_real_listener_burst_and_a_listener_shut_down_underneath() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setblocking(False)
        clients = [socket.create_connection(listener.getsockname()) for _ in range(3)]
        got: list[tuple[socket.socket, object]] = []
        try:
            assert accept_burst(listener.accept, 2, got) is None
            assert len(got) == 2
            assert accept_burst(listener.accept, 64, got) is None
            assert len(got) == 3
            # shutdown() on a listening TCP socket disconnects it: accept() then fails with
            # EINVAL for good while the poller keeps reporting it readable.
            listener.shutdown(socket.SHUT_RD)
            for _ in range(3):
                failure = accept_burst(listener.accept, 64, got)
                assert failure is not None
                assert failure.kind is AcceptErrorKind.FATAL
                assert failure.error.errno == errno.EINVAL
        finally:
            for sock, _addr in got:
                sock.close()
            for client in clients:
                client.close()


def test_resource_pause_logs_once_per_episode(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("aioancillary.test_accept")
    pause = ResourcePause(log, "the test loop")
    exc = OSError(errno.EMFILE, "Too many open files")
    with caplog.at_level(logging.DEBUG, logger=log.name):
        pause.recovered()  # no episode: nothing to say
        assert not pause.active
        for _ in range(50):
            assert pause.failed(exc) > 0
        assert pause.active
        pause.recovered()
        pause.recovered()
        for _ in range(5):
            pause.failed(exc)
        pause.recovered()
    levels = [(r.levelno, r.getMessage().split(" (")[0].split(" over")[0]) for r in caplog.records]
    assert levels == [
        (logging.ERROR, "the test loop cannot accept"),
        (logging.WARNING, "the test loop accepts again after 50 failed tries"),
        (logging.ERROR, "the test loop cannot accept"),
        (logging.WARNING, "the test loop accepts again after 5 failed tries"),
    ]
    assert "Too many open files" in caplog.records[0].getMessage()
    assert (pause.episodes, pause.failures, pause.active) == (2, 0, False)


@pytest.mark.parametrize("how", [socket.SHUT_RDWR, socket.SHUT_RD], ids=["SHUT_RDWR", "SHUT_RD"])
def test_a_unix_listener_shut_down_underneath_is_fatal(tmp_path: Path, how: int) -> None:
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(tmp_path / "l.sock"))
        listener.listen()
        listener.setblocking(False)
        got: list[tuple[socket.socket, object]] = []
        # An empty queue is no failure, with or without the fd to check.
        assert accept_burst(listener.accept, 8, got, listener.fileno()) is None
        assert not listener_shut_down(listener.fileno())
        # Shut down (both ways, or for reading only: EPOLLRDHUP without EPOLLHUP): accept()
        # still says EAGAIN, but the socket polls readable (the reader would be called again
        # at once, forever).
        listener.shutdown(how)
        assert listener_shut_down(listener.fileno())
        assert accept_burst(listener.accept, 8, got) is None  # without the fd: not seen
        failure = accept_burst(listener.accept, 8, got, listener.fileno())
        assert failure is not None
        assert failure.kind is AcceptErrorKind.FATAL
        assert failure.error.errno == errno.ESHUTDOWN
        assert got == []
