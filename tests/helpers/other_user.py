"""A hostile local peer running as another user (``nobody``), driven by the test line by line.

The child starts as root (the interpreter may live where ``nobody`` cannot read, under
``/root``), imports what it needs, then drops to ``nobody`` (``setgroups``/``setgid``/
``setuid``) before it reads its first command. Each command is one JSON list on its stdin;
each answer one JSON value on its stdout. Addresses travel as hex (abstract names start with
a NUL byte). Starting it needs root: tests that use it carry :data:`needs_root`.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import subprocess
import sys
import textwrap
from types import TracebackType
from typing import Any, Self

import pytest

NOBODY = pwd.getpwnam("nobody")

#: Tests that start a peer as ``nobody`` (skipped, saying why, when not run as root).
needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="starting a peer as another user (nobody) needs root"
)

_SCRIPT = textwrap.dedent(
    f"""
    import json, os, socket, sys
    os.setgroups([])
    os.setgid({NOBODY.pw_gid})
    os.setuid({NOBODY.pw_uid})
    held = []  # every socket made, the last one first in line for "recv" and "send"
    listeners = []

    def address(text):
        raw = bytes.fromhex(text)
        return raw if raw[:1] == b"\\0" else raw.decode()

    def run(command, *args):
        if command == "swap_symlink":  # replace the file at path by a link to target
            path, target = args
            os.unlink(path)
            os.symlink(target, path)
            return "ok"
        if command == "swap_socket":  # replace the file at path by a socket of ours
            (path,) = args
            os.unlink(path)
            sock = socket.socket(socket.AF_UNIX)
            sock.bind(path)
            held.append(sock)
            return "ok"
        if command == "connect":  # connect to an address and keep the socket
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(10)
            sock.connect(address(args[0]))
            held.append(sock)
            return "connected"
        if command == "recv":  # what the last connection receives: bytes, or end of stream
            data = held[-1].recv(65536)
            return data.hex() if data else "eof"
        if command == "send":
            held[-1].sendall(bytes.fromhex(args[0]))
            return "sent"
        if command == "listen":  # listen on an address; accept one connection later
            sock = socket.socket(socket.AF_UNIX)
            sock.bind(address(args[0]))
            sock.listen()
            sock.settimeout(10)
            listeners.append(sock)
            return "listening"
        if command == "accept":  # on the last listening socket
            conn, _ = listeners[-1].accept()
            held.append(conn)
            return "accepted"
        raise ValueError(command)

    for line in sys.stdin:
        try:
            answer = run(*json.loads(line))
        except OSError as exc:
            answer = {{"errno": exc.errno, "error": str(exc)}}
        print(json.dumps(answer), flush=True)
    """
)


class OtherUser:
    """A process running as ``nobody``: ``ask("connect", address)`` and so on."""

    def __init__(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _SCRIPT],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd="/",
        )

    def ask(self, command: str, *args: str | bytes) -> Any:
        """Run one command in the other user's process and return its answer (blocking)."""
        words = [arg.hex() if isinstance(arg, bytes) else arg for arg in args]
        assert self._proc.stdin is not None
        assert self._proc.stdout is not None
        self._proc.stdin.write(json.dumps([command, *words]) + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the other user's process died (exit {self._proc.wait()})")
        return json.loads(line)

    async def aask(self, command: str, *args: str | bytes) -> Any:
        """:meth:`ask` from a coroutine: the loop runs while the other process works."""
        return await asyncio.wait_for(asyncio.to_thread(self.ask, command, *args), 30)

    def close(self) -> None:
        """End the process (its sockets close with it)."""
        assert self._proc.stdin is not None
        assert self._proc.stdout is not None
        self._proc.stdin.close()
        self._proc.wait(30)
        self._proc.stdout.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
