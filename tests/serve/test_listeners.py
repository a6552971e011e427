"""The serve runner's listeners: which get ``TCP_DEFER_ACCEPT``, and that they get it.

The option is measured to save the runner a wake-up per connection when it accepts, and to
cost workers that accept for themselves (``ServeOptions.defer_accept``): these tests pin
where it goes, on real listening sockets.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from aioancillary._serve._listeners import open_listeners
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
