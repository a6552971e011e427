"""The serve runner's listeners, opened in this process on real sockets: which get
``TCP_DEFER_ACCEPT`` and that they get it, a taken address, stale and live socket files,
IPv6 and named binds. (The runner tests open them in a child process, out of coverage's
sight.)

``TCP_DEFER_ACCEPT`` is measured to save the runner a wake-up per connection when it accepts,
and to cost workers that accept for themselves (``ServeOptions.defer_accept``).
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import pytest

from aioancillary._core._fd import OwnedFd
from aioancillary._lifecycle._systemd import NamedFds
from aioancillary._serve import _listeners
from aioancillary._serve._listeners import BindError, open_listeners
from aioancillary._serve._options import ServeOptions


@pytest.mark.parametrize(
    ("interface", "accept", "expected"),
    [
        ("asgi", "runner", True),
        ("aiohttp", "runner", True),
        ("asgi", "workers", False),
        ("aiohttp", "workers", False),
        ("protocol", "runner", False),  # the server may speak first
        ("handler", "runner", False),
        ("handler", "workers", False),
    ],
)
def test_http_listeners_defer_accept_only_when_the_runner_accepts(
    interface: str, accept: str, expected: bool
) -> None:
    options = ServeOptions(app="m:app", interface=interface, accept=accept)  # type: ignore[arg-type]
    assert options.defer_accept is expected


@pytest.mark.parametrize("defer", [True, False])
def test_open_listeners_sets_defer_accept_on_tcp_listeners_only(
    defer: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LISTEN_FDS", raising=False)
    path = str(tmp_path / "s.sock")
    listeners = open_listeners(("127.0.0.1:0", f"unix:{path}"), backlog=16, defer_accept=defer)
    try:
        tcp, unix = (listener.sock for listener in listeners)
        assert tcp.family == socket.AF_INET
        assert unix.family == socket.AF_UNIX
        # The kernel keeps the option as a number of SYN-ACK retransmissions, reported back as
        # the seconds they span: not 0 is all that can be asserted.
        assert bool(tcp.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT)) is defer
    finally:
        for listener in listeners:
            listener.sock.close()
            listener.remove_path()


def test_a_taken_port_is_a_bind_error_and_closes_what_was_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LISTEN_FDS", raising=False)
    path = tmp_path / "first.sock"
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(BindError, match=r"address already in use .*choose another --bind"):
            open_listeners((f"unix:{path}", f"127.0.0.1:{port}"), backlog=16, defer_accept=True)
    assert not path.exists()  # the listener opened before the failure is gone, file and fd


def test_a_stale_socket_file_is_replaced_and_a_live_one_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LISTEN_FDS", raising=False)
    path = str(tmp_path / "s.sock")
    with socket.socket(socket.AF_UNIX) as killed:  # a runner that died left its file behind
        killed.bind(path)
    [listener] = open_listeners((f"unix:{path}",), backlog=16, defer_accept=False)
    try:
        assert listener.name == f"unix:{path}"
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(path)  # ours now
        # Another runner on the same path must not unlink a socket somebody listens on.
        with pytest.raises(BindError, match="address already in use"):
            open_listeners((f"unix:{path}",), backlog=16, defer_accept=False)
    finally:
        listener.sock.close()
        listener.remove_path()
    assert not Path(path).exists()


def test_ipv6_and_named_binds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LISTEN_FDS", raising=False)
    listeners = open_listeners(("[::1]:0", "web=127.0.0.1:0"), backlog=16, defer_accept=True)
    try:
        v6, named = listeners
        port = v6.sock.getsockname()[1]
        assert v6.name == f"[::1]:{port}"
        assert v6.sock.family == socket.AF_INET6
        assert v6.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT)
        assert named.name == "web"
        assert not named.inherited
    finally:
        for listener in listeners:
            listener.sock.close()


def _passed(monkeypatch: pytest.MonkeyPatch, **socks: socket.socket) -> None:
    """Make ``open_listeners`` find copies of ``socks`` as the service manager's fds, by name
    (``listen_fds()`` reads fds 3 and up, which this process's test runner holds)."""
    items = [(name, OwnedFd(os.dup(sock.fileno()))) for name, sock in socks.items()]
    monkeypatch.setattr(_listeners, "listen_fds", lambda: NamedFds(items, source="systemd"))


def test_inherited_sockets_are_claimed_by_name_or_address_and_the_rest_closed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        socket.create_server(("127.0.0.1", 0)) as web,
        socket.create_server(("127.0.0.1", 0)) as api,
        socket.create_server(("127.0.0.1", 0)) as spare,
    ):
        _passed(monkeypatch, web=web, api=api, spare=spare)
        api_port = api.getsockname()[1]
        # "web=" names a port nobody could bind here: the inherited socket is taken instead.
        binds = ("web=127.0.0.1:1", f"127.0.0.1:{api_port}")
        with caplog.at_level(logging.INFO, logger="aioancillary.serve"):
            listeners = open_listeners(binds, backlog=16, defer_accept=False)
        try:
            assert [(lst.name, lst.inherited) for lst in listeners] == [
                ("web", True),
                (f"127.0.0.1:{api_port}", True),  # same address: adopted, not bound again
            ]
            assert listeners[0].sock.getsockname() == web.getsockname()
            assert "closing inherited sockets no --bind claims: ['spare']" in caplog.text
        finally:
            for listener in listeners:
                listener.sock.close()


def test_without_binds_every_inherited_socket_is_served(monkeypatch: pytest.MonkeyPatch) -> None:
    with (
        socket.create_server(("127.0.0.1", 0)) as web,
        socket.create_server(("::1", 0), family=socket.AF_INET6) as web6,
    ):
        _passed(monkeypatch, web=web, web6=web6)
        listeners = open_listeners((), backlog=16, defer_accept=True)
        try:
            assert [lst.name for lst in listeners] == ["web", "web6"]
            for listener in listeners:
                assert listener.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT)
        finally:
            for listener in listeners:
                listener.sock.close()


def test_an_inherited_socket_that_does_not_listen_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with socket.socket() as idle, socket.create_server(("127.0.0.1", 0)) as web:
        _passed(monkeypatch, web=web, idle=idle)
        with pytest.raises(BindError, match=r"'idle' is not a listening stream socket"):
            open_listeners(("web=127.0.0.1:1", "idle=127.0.0.1:1"), backlog=16, defer_accept=False)
