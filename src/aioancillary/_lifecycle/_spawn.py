"""Start any program with named fds, the way systemd does: ``spawn_with_fds``.

``sd_listen_fds(3)`` is what Go (``coreos/go-systemd/activation``), Rust (``listenfd``,
``sd-notify``), C (``libsystemd``) and Python (``listen_fds``) programs read: fds at 3, 4,
..., ``LISTEN_FDS`` (how many), ``LISTEN_FDNAMES`` (their names, ``:``-separated), and
``LISTEN_PID``, which must equal the program's own pid. So the pid has to be written after
``fork()`` and before ``exec()``, and the fds moved to 3, 4, ... there too. How:

* ``preexec_fn`` runs Python between fork and exec, which is unsafe in a process with threads
  (a lock held by another thread at fork time stays locked in the child forever);
* ``posix_spawn`` can move fds but cannot know the pid before the child exists;
* ``sh -c 'exec 3<&7; LISTEN_PID=$$ ... exec "$@"'``: dash (Debian's ``/bin/sh``) reads only
  one-digit fd numbers in redirections, so more than a few fds cannot be placed;
* ``pass_fds=`` places nothing (fds keep their numbers), and uvloop's spawn implements it by
  making the parent's fds inheritable for the duration of the call: another thread forking
  meanwhile would leak them into an unrelated program.

So the child is a small exec wrapper (``_exec_wrapper.py``, run by this interpreter with
``-I -S``) that *fetches* the fds: the parent listens on a ``SOCK_SEQPACKET`` socket of its
own (an abstract name on Linux), the wrapper connects, the parent checks that the peer is the
very child it started (``SO_PEERCRED`` pid) and sends the fds with ``SCM_RIGHTS``. The
parent's fds are never duplicated or made inheritable in the parent, not even briefly; the
wrapper places them, closes everything else above 2, sets ``LISTEN_PID`` to its pid and
execs the program, which keeps that pid. The price is the start of a small interpreter
(tens of milliseconds) before the program's own start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .._asyncio._connection import AncillaryConnection
from .._core._errors import ConnectionClosedError, InvalidFdError, SpawnError
from .._core._fd import FdLike, fd_number
from .._core._platform import SCM_MAX_FD
from .._kernel._peercred import peer_credentials
from ._systemd import check_fdname

__all__ = ["SpawnError", "spawn_with_fds"]

logger = logging.getLogger("aioancillary")

_WRAPPER = Path(__file__).with_name("_exec_wrapper.py")
# Abstract socket names (unix(7)) need no file and no cleanup; elsewhere, a private directory.
_ABSTRACT = sys.platform.startswith("linux")
_LISTEN_VARS = ("LISTEN_PID", "LISTEN_PIDFDID", "LISTEN_FDS", "LISTEN_FDNAMES")
# Arguments that would undo what spawn_with_fds guarantees, or that it sets itself.
_REFUSED = ("pass_fds", "close_fds", "preexec_fn", "executable", "shell")


def _named_fds(fds: Mapping[str, FdLike | Sequence[FdLike]]) -> list[tuple[str, int]]:
    """``(name, fd number)`` in ``LISTEN_FDNAMES`` order, every fd checked open."""
    items: list[tuple[str, int]] = []
    for name, value in fds.items():
        check_fdname(name)
        values = list(value) if isinstance(value, Sequence) else [value]
        if not values:
            raise ValueError(f"no fd under {name!r}: give an fd or a non-empty list")
        for fd in values:
            num = fd_number(fd)
            try:
                os.fstat(num)
            except OSError as exc:
                raise InvalidFdError(
                    f"fd {num} named {name!r} is not open ({exc.strerror}); nothing was started"
                ) from None
            items.append((name, num))
    return items


def _environment(base: Mapping[str, str], names: list[str]) -> dict[str, str]:
    env = {key: value for key, value in base.items() if key not in _LISTEN_VARS}
    env["LISTEN_FDS"] = str(len(names))
    if names:
        env["LISTEN_FDNAMES"] = ":".join(names)
    return env  # LISTEN_PID: the wrapper writes its own pid, which the program keeps


def _rendezvous() -> tuple[socket.socket, str, Callable[[], None]]:
    """A listening ``SOCK_SEQPACKET`` socket, its address for the wrapper, and a cleanup."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)  # close-on-exec (PEP 446)
    try:
        if _ABSTRACT:
            name = f"aioancillary-spawn-{os.getpid()}-{secrets.token_hex(8)}"
            sock.bind("\0" + name)
            address, cleanup = "@" + name, _nothing
        else:
            # Reachable by a child that changed user (user=): the peer's pid is what is checked.
            directory = tempfile.mkdtemp(prefix="aioancillary-spawn-")
            os.chmod(directory, 0o711)
            address = os.path.join(directory, "s")
            sock.bind(address)
            os.chmod(address, 0o666)
            cleanup = lambda: shutil.rmtree(directory, ignore_errors=True)  # noqa: E731
        sock.listen(4)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock, address, cleanup


def _nothing() -> None:
    pass


async def _accept_child(listener: socket.socket, pid: int) -> socket.socket:
    """The connection of process ``pid``; anyone else's is closed unanswered."""
    loop = asyncio.get_running_loop()
    while True:
        sock, _ = await loop.sock_accept(listener)
        try:
            creds = peer_credentials(sock)
        except OSError:
            creds = None
        if creds is not None and creds.pid == pid:
            return sock
        logger.warning("refused %s on the exec wrapper's socket of pid %d", creds, pid)
        sock.close()


async def _first(main: asyncio.Future[Any], died: asyncio.Future[int]) -> None:
    """Wait for ``main``; raise ``SpawnError`` if the wrapper exits first."""
    await asyncio.wait({main, died}, return_when=asyncio.FIRST_COMPLETED)
    if not main.done():
        main.cancel()
        await asyncio.wait({main})  # never raises: an outer cancellation still reaches us
        if not main.cancelled() and isinstance(main.result(), socket.socket):
            main.result().close()  # it connected just as it died
        raise SpawnError(
            f"the exec wrapper exited with status {died.result()} before it took its fds "
            "(its reason is on its stderr)"
        )


async def _hand_over(
    listener: socket.socket, proc: asyncio.subprocess.Process, fds: list[int], program: str
) -> None:
    """Give ``fds`` to the wrapper ``proc`` and wait until it has exec'd ``program``."""
    died = asyncio.ensure_future(proc.wait())
    try:
        accepting = asyncio.ensure_future(_accept_child(listener, proc.pid))
        await _first(accepting, died)
        conn = AncillaryConnection(accepting.result())
        try:
            for start in range(0, len(fds), SCM_MAX_FD):
                await conn.send_fds(b"F", fds[start : start + SCM_MAX_FD])
            try:
                report = await conn.recv()  # exec closes the wrapper's end: end of stream
            except ConnectionClosedError:
                return
            with report:
                text = report.data.decode(errors="replace")
        finally:
            conn.close()
            await conn.wait_closed()
    finally:
        died.cancel()
    code, _, reason = text.partition(" ")
    await proc.wait()
    if code[:1] == "E" and code[1:].isdigit():
        raise OSError(int(code[1:]), reason, program)  # e.g. FileNotFoundError, as exec gives
    raise SpawnError(f"the exec wrapper said {text!r} instead of running {program!r}")


async def spawn_with_fds(
    argv: Sequence[str | os.PathLike[str]],
    fds: Mapping[str, FdLike | Sequence[FdLike]],
    *,
    start_timeout: float = 60.0,
    **kwargs: Any,
) -> asyncio.subprocess.Process:
    """Start ``argv`` with the named ``fds`` at 3, 4, ..., as systemd socket activation does.

    The program finds ``LISTEN_FDS`` (how many), ``LISTEN_FDNAMES`` (their names, in order,
    ``:``-separated) and ``LISTEN_PID`` (its own pid) in its environment: the
    ``sd_listen_fds(3)`` protocol, which programs in any language read. It inherits nothing
    but those fds and 0-2; the fds here are borrowed (still open, never made inheritable in
    this process): close them once this returns if only the child needs them. The module
    docstring explains the exec wrapper this takes.

    Example::

        listener = socket.create_server(("127.0.0.1", 8080))
        proc = await spawn_with_fds(["./server"], {"web": listener})
        listener.close()                   # the child has its own copy

    Args:
        argv: The program and its arguments (looked up in ``PATH`` as ``exec`` does).
        fds: Name to fd, or to a list of fds (several under one name); names follow
            systemd's ``FDNAME=`` rule. Dict order is ``LISTEN_FDNAMES`` order.
        start_timeout: Seconds the exec wrapper may take to start and take its fds.
        **kwargs: For ``asyncio.create_subprocess_exec`` (``stdin``, ``stdout``,
            ``env``, ``cwd``, ``start_new_session``...). ``env`` (default: this process's
            environment) loses any ``LISTEN_*`` variable it has.

    Returns:
        The ``asyncio.subprocess.Process``, once the program has been exec'd.

    Raises:
        ValueError: an invalid name, or a name with an empty list.
        InvalidFdError: an fd is not open; nothing was started.
        TypeError: an argument this function sets or refuses (``pass_fds``, ``close_fds``,
            ``preexec_fn``, ``executable``, ``shell``).
        OSError: the program could not be exec'd (``FileNotFoundError``,
            ``PermissionError``...); the wrapper process was reaped.
        SpawnError: the wrapper did not start or take its fds within ``start_timeout``.
    """
    refused = [name for name in _REFUSED if name in kwargs]
    if refused:
        raise TypeError(f"spawn_with_fds() sets or refuses {refused}: leave them out")
    args = [os.fspath(arg) for arg in argv]
    if not args:
        raise ValueError("argv is empty: give the program to start")
    items = _named_fds(fds)
    if not sys.executable:
        raise SpawnError("sys.executable is unknown: no interpreter to run the exec wrapper")
    env = kwargs.pop("env", None)
    env = _environment(os.environ if env is None else env, [name for name, _ in items])
    listener, address, cleanup = _rendezvous()
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-I", "-S", str(_WRAPPER), address, str(len(items)), *args,
            env=env,
            **kwargs,
        )  # fmt: skip
        try:
            try:
                async with asyncio.timeout(start_timeout):
                    await _hand_over(listener, proc, [num for _, num in items], args[0])
            except TimeoutError:
                raise SpawnError(
                    f"the exec wrapper did not take its fds within {start_timeout} s (is the "
                    "machine overloaded?); it was killed"
                ) from None
        except BaseException:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            await proc.wait()
            raise
    finally:
        listener.close()
        cleanup()
    return proc
