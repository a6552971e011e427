"""Fork safety's registry (``_kernel/_fork.py``): in a child, right after ``fork()``, every
tracked object closes its own copies, and one that fails does not stop the others."""

from __future__ import annotations

import os

from helpers import FORKS_THE_TEST_PROCESS

from aioancillary._kernel import _fork


class Tracked:
    def __init__(self, fd: int, fails: bool = False) -> None:
        self.fd = fd
        self.fails = fails

    def _forked(self) -> None:
        if self.fails:
            raise RuntimeError("a tracked object that fails in the child")
        os.close(self.fd)


def test_track_returns_the_pid() -> None:
    r, w = os.pipe()
    try:
        assert _fork.track(Tracked(r)) == os.getpid()
    finally:
        os.close(r)
        os.close(w)


@FORKS_THE_TEST_PROCESS
def test_the_child_closes_every_tracked_copy_and_the_parent_keeps_its_own() -> None:
    r, w = os.pipe()
    failing = Tracked(-1, fails=True)
    tracked = Tracked(r)
    _fork.track(failing)
    _fork.track(tracked)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.fstat(r)
        except OSError:
            code = 0  # closed by the at-fork hook, despite the failing object before it
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    try:
        assert os.waitstatus_to_exitcode(status) == 0
        os.fstat(r)  # the parent's copy is untouched
    finally:
        os.close(r)
        os.close(w)
