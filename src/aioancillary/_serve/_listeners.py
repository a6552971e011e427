"""The runner's listening sockets: inherited from the service manager (``LISTEN_FDS``) by
name or by address, or bound here.

Inherited sockets are adopted before anything binds (a fresh bind would race the inherited
socket for the same port); inherited sockets no ``--bind`` claims are closed, with a log line.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
from dataclasses import dataclass

from .._core._errors import FdTypeError
from .._lifecycle._systemd import listen_fds
from ._options import DEFAULT_BIND, Bind, parse_bind

__all__ = ["BindError", "Listener", "open_listeners"]

logger = logging.getLogger("aioancillary.serve")


class BindError(Exception):
    """A listener could not be opened (the message says which and what to do)."""


@dataclass
class Listener:
    """A listening socket and how workers see it."""

    sock: socket.socket
    name: str
    #: The socket file this process created (removed again at exit), for ``unix:`` binds.
    path: str | None = None
    inherited: bool = False

    def describe(self) -> str:
        where = "inherited" if self.inherited else "bound"
        return f"{self.name} ({where})"

    def remove_path(self) -> None:
        """Remove the socket file this runner created, if it is still ours."""
        if self.path is None:
            return
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)


def open_listeners(binds: tuple[str, ...], *, backlog: int, defer_accept: bool) -> list[Listener]:
    """Every listener of ``binds`` (see `parse_bind`), inherited ones first.

    Without ``binds``: every socket the service manager passed, or `DEFAULT_BIND`.

    Raises:
        BindError: an address is taken, unusable, or an inherited fd is not a listener. The
            sockets opened so far are closed.
    """
    listeners: list[Listener] = []
    inherited: list[tuple[str, socket.socket]] = []
    try:
        with listen_fds() as passed:  # closes (and logs) the fds that are not sockets
            for name in passed.names():
                with contextlib.suppress(FdTypeError):
                    inherited += [(name, sock) for sock in passed.take_sockets(name)]
        if not binds and inherited:
            listeners = [_adopt(sock, name) for name, sock in inherited]
            inherited = []
        else:
            for bind in [parse_bind(text) for text in binds or (DEFAULT_BIND,)]:
                claimed = [
                    (name, sock)
                    for name, sock in inherited
                    if (name == bind.name if bind.name else _same_address(sock, bind))
                ]
                if claimed:
                    adopted = [_adopt(sock, bind.name or bind.text) for _, sock in claimed]
                    inherited = [item for item in inherited if item not in claimed]
                    listeners += adopted
                elif bind.is_unix:
                    listeners.append(_listen_unix(bind, backlog))
                else:
                    listeners.append(_listen_inet(bind, backlog))
        if defer_accept:
            for listener in listeners:
                if listener.sock.family in (socket.AF_INET, socket.AF_INET6):
                    # HTTP clients speak first: accept() returns a client once its request
                    # is in (tcp(7)), so the worker reads it at once.
                    listener.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 1)
    except BaseException:
        for listener in listeners:
            listener.sock.close()
            listener.remove_path()
        raise
    finally:
        if inherited:
            logger.info(
                "closing inherited sockets no --bind claims: %s", [name for name, _ in inherited]
            )
            for _name, sock in inherited:
                sock.close()
    return listeners


def _adopt(sock: socket.socket, name: str) -> Listener:
    if sock.type != socket.SOCK_STREAM or not sock.getsockopt(
        socket.SOL_SOCKET, socket.SO_ACCEPTCONN
    ):
        sock.close()
        raise BindError(
            f"the socket passed as {name!r} is not a listening stream socket: check the "
            "socket unit (ListenStream=, Accept=no)"
        )
    return Listener(sock, name, inherited=True)


def _same_address(sock: socket.socket, bind: Bind) -> bool:
    if sock.family != bind.family:
        return False
    try:
        address = sock.getsockname()
    except OSError:
        return False
    if bind.is_unix:
        return bool(address) and os.fsdecode(address) == bind.host
    return bool(address[1] == bind.port and address[0] == bind.host)


def _listen_inet(bind: Bind, backlog: int) -> Listener:
    try:
        infos = socket.getaddrinfo(
            bind.host, bind.port, bind.family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise BindError(f"cannot listen on {bind.text}: {exc.strerror}") from None
    family, _type, _proto, _name, address = infos[0]
    try:
        sock = socket.create_server(address, family=family, backlog=backlog)
    except OSError as exc:
        raise BindError(_bind_failed(bind, exc)) from None
    host, port = sock.getsockname()[:2]
    name = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
    return Listener(sock, bind.name or name)


def _listen_unix(bind: Bind, backlog: int) -> Listener:
    path = bind.host
    _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise BindError(_bind_failed(bind, exc)) from None
    return Listener(sock, bind.name or f"unix:{path}", path=path)


def _remove_stale(path: str) -> None:
    """Remove a socket file nobody listens on any more (a previous run that was killed)."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return
    except OSError:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        with contextlib.suppress(OSError):
            os.unlink(path)
    except OSError:
        pass
    finally:
        probe.close()


def _bind_failed(bind: Bind, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return (
            f"cannot listen on {bind.text}: address already in use (another process listens "
            "there: stop it, or choose another --bind)"
        )
    if exc.errno == errno.EACCES:
        return f"cannot listen on {bind.text}: permission denied ({exc.strerror})"
    return f"cannot listen on {bind.text}: {exc.strerror or exc}"
