"""Fork safety: what a child process inherits from an event loop must not hurt the parent.

After ``fork()`` the child shares the parent's epoll instance (``epoll(7)``: registrations
belong to the open file description, which both processes now hold). A child that removes a
reader or writer, or whose inherited uvloop loop is closed (``asyncio.Runner`` does that on
exit), deletes the *parent's* registration, and the parent's reads hang with no error.

So every transport and server registers here. In the child, right after ``fork()``, each of
them closes its copies of the fds it owns without telling the loop, and is inert from then on:
an ``epoll_ctl(EPOLL_CTL_DEL)`` the child's loop may still issue for those numbers then finds no
open fd (EBADF) or another file (ENOENT) and leaves the parent alone. Code that touches the
loop also checks the process id, for a ``fork()`` made without Python's at-fork hooks.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from typing import Protocol

__all__ = ["ForkAware", "track"]


class ForkAware(Protocol):
    """An object owning fds registered with an event loop."""

    def _forked(self) -> None:
        """In a child after ``fork()``: close this process's copies; never touch the loop."""
        ...


_live: weakref.WeakSet[ForkAware] = weakref.WeakSet()


def track(obj: ForkAware) -> int:
    """Register ``obj`` for the at-fork hook; return the current process id."""
    _live.add(obj)
    return os.getpid()


def _after_fork_in_child() -> None:
    inherited = list(_live)
    _live.clear()
    for obj in inherited:
        with contextlib.suppress(Exception):  # the child must come up whatever one does
            obj._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)
