"""systemd socket activation: adopt the fds passed in ``LISTEN_FDS``, by name.

A service manager that starts a process with sockets already open (systemd, or
``systemd-socket-activate`` without systemd) places them at fds 3, 4, ... and describes them in
the environment (``sd_listen_fds(3)``):

* ``LISTEN_PID``: the pid the fds are meant for (a child that inherited the environment must not
  take them);
* ``LISTEN_FDS``: how many fds, starting at ``SD_LISTEN_FDS_START`` (3);
* ``LISTEN_FDNAMES``: their names, ``:``-separated, one per fd (``FileDescriptorName=``,
  ``--fdname=``); several fds may share a name (a socket unit listening on an IPv4 and an IPv6
  address gives two fds of the same name). Without it every fd is named ``"unknown"``.

[`listen_fds`][aioancillary.listen_fds] reads them once, sets close-on-exec on the fds, unsets the
variables (as ``sd_listen_fds(unset_environment=1)`` does, so children do not see them) and returns
a [`NamedFds`][aioancillary.NamedFds]: owned fds looked up by name, taken as
[`OwnedFd`][aioancillary.OwnedFd] or as `socket.socket` of the detected family and type. Fds nobody
takes are closed by [`NamedFds.close`][aioancillary.NamedFds.close]. The same class carries the fds
a reload predecessor hands over (``_reload.py``), so a service finds its listeners by name wherever
they came from.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import stat
from collections.abc import Callable, Iterable, MutableMapping
from typing import Self

from .._core._errors import ActivationError, FdNameError, FdTypeError
from .._core._fd import OwnedFd, close_all

__all__ = [
    "SD_LISTEN_FDS_START",
    "ActivationError",
    "FdNameError",
    "FdTypeError",
    "NamedFds",
    "check_fdname",
    "listen_fds",
]

logger = logging.getLogger("aioancillary")

#: The first fd a service manager passes (``SD_LISTEN_FDS_START`` in ``sd-daemon.h``).
SD_LISTEN_FDS_START = 3
#: systemd refuses longer fd names (``fdname_is_valid``: at most 255 characters).
FDNAME_MAX = 255
# LISTEN_PIDFDID (systemd 257+) pins the pidfd of the target process; sd_listen_fds unsets it too.
_LISTEN_VARS = ("LISTEN_PID", "LISTEN_PIDFDID", "LISTEN_FDS", "LISTEN_FDNAMES")


def check_fdname(name: str) -> str:
    """Return ``name`` if systemd accepts it as an fd name; raise otherwise.

    systemd's rule (``fdname_is_valid``): printable ASCII (32-126) except ``:`` (the
    ``LISTEN_FDNAMES`` separator), at most 255 characters.

    Raises:
        ValueError: the name breaks the rule.
    """
    if not isinstance(name, str):
        raise TypeError(f"an fd name must be a str, got {type(name).__name__}")
    if len(name) > FDNAME_MAX:
        raise ValueError(
            f"fd name of {len(name)} characters: systemd accepts at most {FDNAME_MAX}; "
            "choose a shorter name"
        )
    bad = [ch for ch in name if not " " <= ch <= "~" or ch == ":"]
    if bad:
        raise ValueError(
            f"fd name {name!r} contains {bad[0]!r}: systemd accepts printable ASCII only, "
            "without ':' (the LISTEN_FDNAMES separator); choose another name"
        )
    return name


_FILE_KINDS = (
    (stat.S_ISREG, "a regular file"),
    (stat.S_ISFIFO, "a FIFO (pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISDIR, "a directory"),
)


def _kind(mode: int) -> str:
    for test, text in _FILE_KINDS:
        if test(mode):
            return text
    return "not a socket"


# The socket types that listen(2) applies to; SO_ACCEPTCONN tells whether it was called.
_LISTENING_KINDS = (socket.SOCK_STREAM, socket.SOCK_SEQPACKET)


def _check_socket(
    num: int, name: str, family: int | None, sock_type: int | None, listening: bool
) -> None:
    """Raise [`FdTypeError`][aioancillary.FdTypeError] unless fd ``num`` is a socket of the
    family/type asked for (and listening, if asked)."""
    mode = os.fstat(num).st_mode
    if not stat.S_ISSOCK(mode):
        raise FdTypeError(
            f"fd {num} named {name!r} is {_kind(mode)}, not a socket (systemd passes such fds "
            "for ListenFIFO=/ListenSpecial= or the fd store): take it with take_fd() instead"
        )
    # socket.socket(fileno=) reads SO_DOMAIN/SO_TYPE itself; detach() leaves the fd untouched.
    probe = socket.socket(fileno=num)
    got_family, got_type = probe.family, probe.type
    accepts = got_type in _LISTENING_KINDS and probe.getsockopt(
        socket.SOL_SOCKET, socket.SO_ACCEPTCONN
    )
    probe.detach()
    if family is not None and got_family != family:
        raise FdTypeError(
            f"fd {num} named {name!r} is a {socket.AddressFamily(got_family).name} socket, "
            f"not {socket.AddressFamily(family).name}: check the unit's Listen*= lines"
        )
    if sock_type is not None and got_type != sock_type:
        raise FdTypeError(
            f"fd {num} named {name!r} is a {socket.SocketKind(got_type).name} socket, "
            f"not {socket.SocketKind(sock_type).name}: check the unit's Listen*= lines"
        )
    if listening and got_type in _LISTENING_KINDS and not accepts:
        raise FdTypeError(
            f"fd {num} named {name!r} is a {socket.SocketKind(got_type).name} socket that is "
            "not listening (SO_ACCEPTCONN is off: a connected socket, or one that never "
            "listened) where a listener was asked for; take a connected socket with "
            "listening=False"
        )


class NamedFds:
    """Owned fds looked up by name: from systemd ([`listen_fds`][aioancillary.listen_fds]) or a
    predecessor.

    Names may repeat (systemd gives several fds the same name when a unit has several ``Listen*=``
    lines): [`take_fds`][aioancillary.NamedFds.take_fds] and
    [`take_sockets`][aioancillary.NamedFds.take_sockets] take all fds of a name, in order;
    [`take_fd`][aioancillary.NamedFds.take_fd] and
    [`take_socket`][aioancillary.NamedFds.take_socket] insist on exactly one. Taking moves the fd
    out: the caller owns it. [`close`][aioancillary.NamedFds.close] (or leaving ``with``) closes
        every fd not taken.

    Example::

        with listen_fds() as fds:
            web = fds.take_socket("web", type=socket.SOCK_STREAM)
            state = fds.take_fd("state") if "state" in fds else None
        # fds nobody took are closed here
        server = await asyncio.start_server(handle, sock=web)

    Attributes:
        source: Where the fds came from: ``"systemd"``, ``"predecessor"`` or ``"none"``.
    """

    def __init__(self, items: Iterable[tuple[str, OwnedFd]] = (), source: str = "none") -> None:
        """Hold ``(name, fd)`` pairs; the object owns the fds from now on."""
        self._items: list[tuple[str, OwnedFd]] = list(items)
        self.source = source

    def names(self) -> list[str]:
        """The distinct names of the fds still held, in the order they came."""
        return list(dict.fromkeys(name for name, _ in self._items))

    def __contains__(self, name: object) -> bool:
        return any(item_name == name for item_name, _ in self._items)

    def __len__(self) -> int:
        """How many fds are still held (not taken, not closed)."""
        return len(self._items)

    def _missing(self, name: str) -> FdNameError:
        have = ", ".join(repr(n) for n in self.names()) or "none"
        where = {
            "systemd": "check FileDescriptorName= / --fdname= of the socket unit",
            "predecessor": "the previous generation did not offer it",
        }.get(self.source, "nothing was inherited")
        return FdNameError(f"no fd named {name!r} (names held: {have}): {where}")

    def take_fds(self, name: str) -> tuple[OwnedFd, ...]:
        """Take every fd named ``name``, in the order they came; the caller owns them.

        Raises:
            FdNameError: no fd has that name.
        """
        taken = tuple(fd for item_name, fd in self._items if item_name == name)
        if not taken:
            raise self._missing(name)
        self._items = [item for item in self._items if item[0] != name]
        return taken

    def take_fd(self, name: str) -> OwnedFd:
        """Take the one fd named ``name``.

        Raises:
            FdNameError: no fd, or several fds, have that name (nothing is taken then; use
                [`take_fds`][aioancillary.NamedFds.take_fds] for several).
        """
        count = sum(1 for item_name, _ in self._items if item_name == name)
        if count > 1:
            raise FdNameError(
                f"{count} fds are named {name!r}: take them all with take_fds() or take_sockets()"
            )
        (fd,) = self.take_fds(name)
        return fd

    def take_socket(
        self,
        name: str,
        *,
        family: int | None = None,
        type: int | None = None,
        create: Callable[[], socket.socket] | None = None,
        listening: bool = False,
    ) -> socket.socket:
        """Take the one socket named ``name``; or, when no fd has that name, ``create()`` one.

        The returned `socket.socket` has the family and type of the fd (detected);
        ``family``/``type`` make the call refuse anything else, and ``listening=True`` a
        stream or seqpacket socket that is not listening (``SO_ACCEPTCONN``; datagram
        sockets never listen and are not checked). ``create`` gives "inherit by name, or
        bind if absent" in one call: the first process binds, later ones inherit.

        Example::

            listener = fds.take_socket(
                "web", create=lambda: socket.create_server(("127.0.0.1", 8080))
            )

        Raises:
            FdNameError: no fd has that name (and no ``create``), or several have.
            FdTypeError: the fd is not a socket, or not of ``family``/``type``, or not
                listening; it is left in this object.
        """
        if create is not None and name not in self:
            return create()
        count = sum(1 for item_name, _ in self._items if item_name == name)
        if count > 1:
            raise FdNameError(f"{count} fds are named {name!r}: take them with take_sockets()")
        return self.take_sockets(name, family=family, type=type, listening=listening)[0]

    def take_sockets(
        self,
        name: str,
        *,
        family: int | None = None,
        type: int | None = None,
        listening: bool = False,
    ) -> list[socket.socket]:
        """Take every fd named ``name`` as a socket (all checked before any is taken).

        Raises:
            FdNameError: no fd has that name.
            FdTypeError: one of them is not a socket of ``family``/``type`` (or not
                listening, with ``listening=True``); none is taken.
        """
        fds = [fd for item_name, fd in self._items if item_name == name]
        if not fds:
            raise self._missing(name)
        for fd in fds:
            # All checked before any is taken.
            _check_socket(fd.fileno(), name, family, type, listening)
        self.take_fds(name)
        return [fd.into_socket() for fd in fds]

    def close(self) -> list[str]:
        """Close every fd not taken; return their names (for a log line)."""
        items, self._items = self._items, []
        close_all(fd for _, fd in items)
        return [name for name, _ in items]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        closed = self.close()
        if closed:
            logger.info("closed %d unclaimed inherited fd(s): %s", len(closed), closed)

    def __repr__(self) -> str:
        return f"<NamedFds source={self.source} names={self.names()} fds={len(self)}>"


def _parse_count(env: MutableMapping[str, str], var: str) -> int:
    text = env[var]
    try:
        value = int(text, 10)
    except ValueError:
        value = -1
    if value < 0 or not (text.isascii() and text.isdigit()):
        raise ActivationError(
            f"{var}={text!r} is not a non-negative integer: the service manager's environment "
            "is malformed (unset it, or start the process through systemd-socket-activate)"
        )
    return value


def own_pidfd_id() -> int | None:
    """This process's pidfd inode number, or ``None`` where the kernel has no pidfs (< 6.9).

    That number names a process for good, where a pid can be reused; systemd 257+ passes it
    as ``LISTEN_PIDFDID``. Without pidfs a pidfd is an anonymous inode that every pidfd (and
    eventfd) shares, so it names nothing: then, as ``sd_listen_fds`` does, there is nothing
    to check.
    """
    try:
        pidfd = os.pidfd_open(os.getpid())
    except (AttributeError, OSError):
        return None
    try:
        st = os.fstat(pidfd)
        probe = os.eventfd(0)  # an anonymous inode, to tell pidfs from anon_inodefs
        try:
            anon = os.fstat(probe)
        finally:
            os.close(probe)
    except (AttributeError, OSError):
        return None
    finally:
        os.close(pidfd)
    if (st.st_dev, st.st_ino) == (anon.st_dev, anon.st_ino):
        return None
    return st.st_ino


def _check_pidfd_id(expected: int) -> None:
    own = own_pidfd_id()
    if own is not None and own != expected:
        raise ActivationError(
            f"LISTEN_PIDFDID={expected} but this process's pidfd id is {own}: LISTEN_PID "
            "matches only because the pid was reused, and the activated fds were meant for a "
            "process that is gone. Start the service binary directly, or call "
            "listen_fds(unset_environment=True) in the process that was activated"
        )


def _read_environment(env: MutableMapping[str, str]) -> list[tuple[str, int]]:
    if "LISTEN_PID" not in env or "LISTEN_FDS" not in env:
        return []
    pid = _parse_count(env, "LISTEN_PID")
    if pid != os.getpid():
        raise ActivationError(
            f"LISTEN_PID={pid} but this process is {os.getpid()}: the activated fds were "
            "passed to another process and this one inherited its environment. Start the "
            "service binary directly (exec it from wrapper scripts), or call "
            "listen_fds(unset_environment=True) in the process that was activated"
        )
    if "LISTEN_PIDFDID" in env:
        _check_pidfd_id(_parse_count(env, "LISTEN_PIDFDID"))
    count = _parse_count(env, "LISTEN_FDS")
    if "LISTEN_FDNAMES" in env:
        # sd_listen_fds_with_names splits without coalescing: "a::b" is three names.
        names = env["LISTEN_FDNAMES"].split(":")
        if len(names) != count:
            raise ActivationError(
                f"LISTEN_FDNAMES has {len(names)} name(s) for LISTEN_FDS={count} fd(s): the "
                "service manager's environment is inconsistent"
            )
    else:
        names = ["unknown"] * count  # what sd_listen_fds_with_names reports without names
    fds = range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count)
    for fd in fds:
        try:
            os.fstat(fd)
        except OSError as exc:
            raise ActivationError(
                f"LISTEN_FDS={count} but fd {fd} is not open ({exc.strerror}): something "
                "closed the activated fds before listen_fds() ran; call it first thing"
            ) from exc
    return list(zip(names, fds, strict=True))


def listen_fds(
    *, unset_environment: bool = True, environ: MutableMapping[str, str] | None = None
) -> NamedFds:
    """Adopt the fds a service manager passed (``LISTEN_FDS``), by name; see ``sd_listen_fds(3)``.

    Each fd is set close-on-exec (as ``sd_listen_fds`` does) and owned by the returned
    [`NamedFds`][aioancillary.NamedFds] (``source="systemd"``). Without
    ``LISTEN_PID``/``LISTEN_FDS`` in the environment the result is empty (``source="none"``): the
    process was not socket-activated. Call it once, early: the variables are unset by default, so a
    second call finds nothing.

    Example::

        fds = listen_fds()                   # e.g. under systemd-socket-activate --fdname=web
        web = fds.take_socket("web", create=lambda: socket.create_server(("127.0.0.1", 8080)))
        fds.close()                          # anything not taken

    Args:
        unset_environment: Remove ``LISTEN_PID``, ``LISTEN_FDS``, ``LISTEN_FDNAMES`` (and
            ``LISTEN_PIDFDID``) from the environment, also when an error is raised, as
            ``sd_listen_fds(1)`` does; ``False`` leaves them.
        environ: The environment to read (default `os.environ`).

    Raises:
        ActivationError: ``LISTEN_PID`` names another process (or, where the kernel has pidfs,
            ``LISTEN_PIDFDID`` shows the pid was reused), a variable is malformed, the names
            do not match the count, or a passed fd is not open. Nothing is taken.
    """
    env = os.environ if environ is None else environ
    try:
        found = _read_environment(env)
        for _, fd in found:
            # The fds arrive inheritable (the manager exec'd us with them): not for our children.
            fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.fcntl(fd, fcntl.F_GETFD) | fcntl.FD_CLOEXEC)
    finally:
        if unset_environment:
            for var in _LISTEN_VARS:
                env.pop(var, None)
    if not found:
        return NamedFds((), "none")
    return NamedFds(((name, OwnedFd(fd)) for name, fd in found), "systemd")
