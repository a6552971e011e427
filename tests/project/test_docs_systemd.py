"""The systemd socket-activation page's service runs as the page says: under
``systemd-socket-activate``, with one socket or several sharing a name, answering HTTP clients
such as ``curl`` (an HTTP/1.1 response, not an echo of the request line)."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "how-to" / "systemd-activation.md"
ACTIVATE = shutil.which("systemd-socket-activate")
BODY = b"hello from a socket-activated service\n"

pytestmark = pytest.mark.skipif(
    ACTIVATE is None,
    reason="systemd-socket-activate is not installed (Debian: package systemd); these tests "
    "run the real tool",
)


def app_source() -> str:
    """The page's ``app.py``: the first Python block of "Adopt them by name"."""
    section = PAGE.read_text().split("## Adopt them by name", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match
    return match.group(1)


def free_port() -> int:
    """A TCP port free on both 127.0.0.1 and ::1 right now."""
    while True:
        with socket.create_server(("127.0.0.1", 0)) as v4:
            port: int = v4.getsockname()[1]
            try:
                with socket.create_server(("::1", port), family=socket.AF_INET6):
                    return port
            except OSError:
                continue


@pytest.fixture
def activated(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """``systemd-socket-activate -l 127.0.0.1:P -l ADMIN -l [::1]:P --fdname=web:admin:web``."""
    assert ACTIVATE is not None
    (tmp_path / "app.py").write_text(app_source())
    port, admin = free_port(), tmp_path / "admin.sock"
    with (tmp_path / "log").open("wb") as log:
        proc = subprocess.Popen(
            [
                ACTIVATE,
                *("-l", f"127.0.0.1:{port}", "-l", str(admin), "-l", f"[::1]:{port}"),
                "--fdname=web:admin:web",
                sys.executable,
                "app.py",
            ],
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while not admin.exists():  # the tool binds every socket before it waits
            assert proc.poll() is None, (tmp_path / "log").read_text()
            assert time.monotonic() < deadline, "systemd-socket-activate did not listen"
            time.sleep(0.05)
        yield port, admin
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert "Traceback" not in (tmp_path / "log").read_text()


def http_get_unix(path: Path) -> bytes:
    """What ``curl --unix-socket PATH http://admin/`` receives."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(60)
        sock.connect(str(path))
        sock.sendall(b"GET / HTTP/1.1\r\nHost: admin\r\nUser-Agent: curl\r\n\r\n")
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
    return reply


def test_the_page_service_answers_http_on_every_socket(activated: tuple[int, Path]) -> None:
    port, admin = activated
    for url in (f"http://127.0.0.1:{port}/", f"http://[::1]:{port}/"):
        with urllib.request.urlopen(url, timeout=60) as response:  # an HTTP/1.1 client
            assert response.status == 200
            assert response.read() == BODY
    reply = http_get_unix(admin)
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n")
    assert reply.endswith(b"\r\n\r\n" + BODY)
