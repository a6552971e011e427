"""The acceptor when accept() fails: a broken listener is dropped, resources are waited for,
a worker that refuses clients is retried, and none of it floods the log or spins."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_until
from helpers.acceptor import acceptor_with_workers, link_transport, request

from aioancillary import Acceptor
from aioancillary._kernel import _accel
from aioancillary._kernel._accept import AcceptFailure, classify_accept_error

LOGGER = "aioancillary"


def records(caplog: pytest.LogCaptureFixture, level: int, text: str) -> list[str]:
    """The library's own log lines at ``level`` containing ``text``. Only its logger's: in
    debug mode asyncio warns of slow callbacks ("Executing ... took 0.126 seconds") whenever a
    loaded machine makes one slow, and those are not this test's lines."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == LOGGER and r.levelno == level and text in r.getMessage()
    ]


async def spin_a_little(turns: int = 200) -> None:
    """Let the loop run ``turns`` iterations: a reader left registered on a broken listener
    would be called on each of them (and log each time)."""
    for _ in range(turns):
        await asyncio.sleep(0)


def failing_accept(
    acceptor: Acceptor, name: str, code: int, monkeypatch: pytest.MonkeyPatch
) -> dict[str, int]:
    """Make the listener ``name`` fail with ``code`` while ``state["fail"]`` is true; count the
    failed calls in ``state["failed"]``. On the C path the burst itself (``_accel.accept_into``)
    reports the failure, as the C burst does for a first ``accept4`` failing with ``code``."""
    state = {"fail": 1, "failed": 0}
    listener = next(entry for entry in acceptor._listeners.items if entry.name == name)
    real: Callable[[], Any] = listener.accept

    def accept() -> Any:
        if state["fail"]:
            state["failed"] += 1
            raise OSError(code, "injected")
        return real()

    listener.accept = accept
    c_burst = _accel.accept_into
    if c_burst is not None:

        def accept_into(fd: int, limit: int, into: list[Any], prefix: bytes | None) -> Any:
            if fd == listener.fd and state["fail"]:
                state["failed"] += 1
                exc = OSError(code, "injected")
                return AcceptFailure(classify_accept_error(exc), exc)
            return c_burst(fd, limit, into, prefix)

        monkeypatch.setattr(_accel, "accept_into", accept_into)
    return state


@pytest.mark.parametrize("how", [socket.SHUT_RDWR, socket.SHUT_RD], ids=["SHUT_RDWR", "SHUT_RD"])
@pytest.mark.parametrize("family", ["tcp", "unix"])
async def test_a_listener_failing_for_good_is_dropped_once_and_the_others_served(
    caplog: pytest.LogCaptureFixture, tmp_path: Path, family: str, how: int
) -> None:
    loop = asyncio.get_running_loop()
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    async with acceptor_with_workers(1) as (acceptor, _workers, addr):
        if family == "tcp":
            doomed = socket.create_server(("127.0.0.1", 0))
        else:
            doomed = socket.socket(socket.AF_UNIX)
            doomed.bind(str(tmp_path / "doomed.sock"))
            doomed.listen()
        doomed_fd = doomed.fileno()
        acceptor.add_listener(doomed, name="doomed")
        served = acceptor.listeners[0]
        # Shut down underneath the acceptor: a TCP listener's accept() fails with EINVAL for
        # good; a Unix listener's says EAGAIN while the socket polls POLLRDHUP (SHUT_RD alone:
        # without POLLHUP). Either way the poller keeps reporting it ready.
        doomed.shutdown(how)
        await wait_until(lambda: bool(records(caplog, logging.ERROR, "")))
        await spin_a_little()
        errors = records(caplog, logging.ERROR, "")
        assert len(errors) == 1
        assert "'doomed'" in errors[0]
        assert ("Invalid argument" if family == "tcp" else "shut down") in errors[0]
        assert acceptor.stats().failed_listeners == ("doomed",)
        assert acceptor.listeners == (served,)
        assert doomed.fileno() == -1  # the acceptor owned it: closed
        assert not loop.remove_reader(doomed_fd)  # its reader was removed
        # The other listener is still served, and accepting goes on.
        assert (await request(addr))["worker"] == "w0"
        assert acceptor.stats().accepting
        await spin_a_little()
        assert len(records(caplog, logging.ERROR, "")) == 1


async def test_a_dropped_listeners_id_is_not_reused() -> None:
    async with acceptor_with_workers(1) as (acceptor, _workers, _addr):
        doomed = socket.create_server(("127.0.0.1", 0))
        acceptor.add_listener(doomed, name="doomed", metadata={"which": "doomed"})
        doomed.shutdown(socket.SHUT_RD)
        await wait_until(lambda: acceptor.stats().failed_listeners == ("doomed",))
        fresh = socket.create_server(("127.0.0.1", 0))
        acceptor.add_listener(fresh, name="fresh", metadata={"which": "fresh"})
        answer = await request(fresh.getsockname())
        assert (answer["listener"], answer["metadata"]) == ("fresh", {"which": "fresh"})


async def test_resource_errors_pause_and_log_once_per_episode(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    async with acceptor_with_workers(1) as (acceptor, _workers, addr):
        for episode in (1, 2):
            state = failing_accept(acceptor, "tcp", errno.EMFILE, monkeypatch)
            pending = asyncio.ensure_future(request(addr, f"episode {episode}"))
            # Paced retries (every 100 ms): wait for several of them.
            await wait_until(lambda s=state: s["failed"] >= 4)  # type: ignore[misc]
            assert not pending.done()
            assert len(records(caplog, logging.ERROR, "")) == episode
            assert not acceptor.stats().accepting  # paused between tries, not spinning
            state["fail"] = 0
            answer = await pending
            assert answer["request"] == f"episode {episode}"
            assert len(records(caplog, logging.WARNING, "accepts again")) == episode
        errors = records(caplog, logging.ERROR, "")
        assert len(errors) == 2
        assert "Too many open files" in errors[0] or "injected" in errors[0]
        # Nothing was dropped for a resource error.
        assert acceptor.stats().failed_listeners == ()
        assert len(acceptor.listeners) == 1


async def test_transient_errors_are_skipped_silently(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The Python burst, whose accept can be scripted; the C burst skips transient errors the
    # same way (tests/kernel/test_accept_c.py).
    monkeypatch.setattr(_accel, "accept_into", None)
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    async with acceptor_with_workers(1) as (acceptor, _workers, addr):
        listener = acceptor._listeners.items[0]
        real = listener.accept
        failures = [errno.ECONNABORTED, errno.EPROTO]

        def accept() -> Any:
            if failures:
                raise OSError(failures.pop(), "injected")
            return real()

        listener.accept = accept
        assert (await request(addr))["request"] == "hi"
        assert failures == []
        assert records(caplog, logging.ERROR, "") == []
        assert acceptor.stats().failed_listeners == ()


async def test_a_worker_refusing_clients_is_retried_and_logged_once_per_episode(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    async with acceptor_with_workers(1) as (acceptor, _workers, addr):
        transport = link_transport(acceptor.workers[0])
        real = transport.write_fds
        state = {"fail": 1, "failed": 0}

        def write_fds(data: bytes, fds: Any) -> None:
            if state["fail"]:
                state["failed"] += 1
                # unix(7): too many fds in flight for this user; the worker is alive.
                raise OSError(errno.ETOOMANYREFS, "Too many references")
            real(data, fds)

        transport.write_fds = write_fds  # type: ignore[method-assign,assignment]
        pending = asyncio.ensure_future(request(addr, "refused at first"))
        await wait_until(lambda: state["failed"] >= 4)  # paced retries (every 100 ms)
        assert not pending.done()
        warnings = records(caplog, logging.WARNING, "")
        assert len(warnings) == 1, warnings
        assert "Too many references" in warnings[0]
        assert acceptor.stats().in_flight == 1  # held here, not lost
        state["fail"] = 0
        assert (await pending)["request"] == "refused at first"
        assert len(records(caplog, logging.WARNING, "takes clients again")) == 1
        assert acceptor.stats().lost == 0
        del transport.write_fds
