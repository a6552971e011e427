"""Who may talk to the fd holder: its own user and root by default, or the uids and gids it
was started with; anyone else is refused before any fd moves.

The clients of other users are forked children of this (root) process that drop to that user
(``setgroups``, ``setgid``, ``setuid``) and use the blocking client or a raw socket; each
reports what happened through a pipe. The holder runs on each loop, in a directory every user
can reach; its fd count is checked before and after each child, and the fds a refused child
tried to send are shown closed (a pipe whose write end it sent reads EOF).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import LOOP_NAMES
from helpers.fdholder import (
    WAIT,
    HolderProcess,
    RawPeer,
    holders,
    run_as,
    shared_directory,
)

from aioancillary import (
    FdHolderBlockingClient,
    FdHolderClient,
    FdHolderRefusedError,
    send_fds,
)
from aioancillary._core._framing import frame_header
from aioancillary._fdholder._wire import encode

NOBODY, NOGROUP = 65534, 65534
OTHER = 12345  # a uid and gid no account has

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start clients of other users"),
    pytest.mark.parametrize("loop", LOOP_NAMES),
]


@pytest.fixture(autouse=True)
def _fork_with_threads() -> Iterator[None]:
    # The holder's log reader is a thread; the children run blocking code and _exit at once.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "This process .* is multi-threaded", DeprecationWarning)
        yield


def settled(holder: HolderProcess, expected: int) -> None:
    deadline = time.monotonic() + WAIT
    while holder.fd_count() != expected:
        assert time.monotonic() < deadline, f"{holder.fd_count()} fds, not {expected}"
        time.sleep(0.01)


def baseline(holder: HolderProcess) -> int:
    with RawPeer(holder.path):  # its hello answered: accepted, counted
        count = holder.fd_count() - 1
    settled(holder, count)
    return count


# -- what the children run (after dropping privileges) ------------------------------------


def client_session(path: str) -> dict[str, Any]:
    """Connect with the blocking client; store a pipe, list, retrieve it, delete it."""
    r, w = os.pipe()
    try:
        with FdHolderBlockingClient.connect(path) as holder:
            holder.store("from-child", [w])
            names = [entry.name for entry in holder.list()]
            (copy,) = holder.retrieve("from-child")
            with copy:
                same = os.fstat(copy.fileno()).st_ino == os.fstat(w).st_ino
            holder.delete("from-child")
        return {"names": names, "same": same}
    except FdHolderRefusedError as exc:
        return {"refused": str(exc)}
    finally:
        os.close(r)
        os.close(w)


def async_client_session(path: str) -> dict[str, Any]:
    """:func:`client_session` with the asyncio client, on a loop of the child's own."""

    async def session() -> dict[str, Any]:
        r, w = os.pipe()
        try:
            async with await FdHolderClient.connect(path) as holder:
                await holder.store("from-child", w)
                names = [entry.name for entry in await holder.list()]
                await holder.delete("from-child")
            return {"names": names}
        except FdHolderRefusedError as exc:
            return {"refused": str(exc)}
        finally:
            os.close(r)
            os.close(w)

    return asyncio.run(session())


def pushy_session(path: str) -> dict[str, Any]:
    """Send hello and a store with an fd without waiting for any answer; then read."""
    r, w = os.pipe()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(WAIT)
    try:
        sock.connect(path)
        hello, store = encode("hello", versions=[1]), encode("store", name="pushed")
        data = frame_header(0, len(hello)) + hello
        sent = True
        try:
            sock.sendall(data)
            send_fds(sock, frame_header(1, len(store)) + store, [w])
        except OSError:
            sent = False  # the holder closed the socket first: even better
        try:
            answer = sock.recv(4096)
        except ConnectionResetError:
            answer = b""
        os.close(w)
        w = -1
        # EOF on the pipe: the copy sent in flight was destroyed with the socket, no process
        # (the holder included) holds a write end.
        os.set_blocking(r, False)
        eof = os.read(r, 1) == b""
        return {"sent": sent, "answer": answer.decode(errors="replace"), "pipe_eof": eof}
    finally:
        sock.close()
        os.close(r)
        if w >= 0:
            os.close(w)


def takeover_attempt(path: str) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(WAIT)
        sock.connect(path)
        answers = []
        for message in (encode("hello", versions=[1]), encode("takeover", pid=os.getpid())):
            sock.sendall(frame_header(0, len(message)) + message)
            answers.append(sock.recv(65536)[8:].decode())
        return {"answers": answers}


# -- the tests -----------------------------------------------------------------------------


def start(directory: Path, started: list[HolderProcess], loop: str, *options: str) -> HolderProcess:
    holder = HolderProcess(directory / "holder.sock", loop, *options)
    started.append(holder)
    return holder.serving()


def test_another_user_is_refused_before_any_fd_moves(loop: str) -> None:
    with shared_directory() as directory, holders() as started:
        # Someone else is admitted, so the socket file is open to all (0666): only the
        # credentials check stands between nobody and the store.
        holder = start(directory, started, loop, "--allow-uid", str(OTHER))
        assert os.stat(holder.path).st_mode & 0o777 == 0o666
        base = baseline(holder)
        result = run_as(NOBODY, NOGROUP, client_session, holder.path)
        assert "refused" in result.get("ok", {}), result
        assert (
            f"it does not admit this process (uid {NOBODY}, gid {NOGROUP}"
            in result["ok"]["refused"]
        )
        result = run_as(NOBODY, NOGROUP, async_client_session, holder.path)["ok"]
        assert f"it does not admit this process (uid {NOBODY}" in result["refused"], result
        result = run_as(NOBODY, NOGROUP, pushy_session, holder.path)["ok"]
        assert result["answer"] == ""  # closed without a word
        assert result["pipe_eof"], result
        holder.wait_log(f"uid={NOBODY}, gid={NOGROUP}) was refused by the authorize callback")
        settled(holder, base)
        with FdHolderBlockingClient.connect(holder.path) as client:
            assert client.list() == []


def test_by_default_only_the_holder_s_user_and_root_can_reach_it(loop: str) -> None:
    with shared_directory() as directory, holders() as started:
        holder = start(directory, started, loop)
        assert os.stat(holder.path).st_mode & 0o777 == 0o600
        base = baseline(holder)
        result = run_as(NOBODY, NOGROUP, client_session, holder.path)["ok"]
        assert "Permission denied" in result["refused"], result
        assert "--allow-uid/--allow-gid" in result["refused"]
        settled(holder, base)


def test_allowed_uids_may_store_retrieve_list_and_delete(loop: str) -> None:
    with shared_directory() as directory, holders() as started:
        holder = start(directory, started, loop, "--allow-uid", "nobody")
        base = baseline(holder)
        result = run_as(NOBODY, NOGROUP, client_session, holder.path)
        assert result["ok"] == {"names": ["from-child"], "same": True}, result
        result = run_as(NOBODY, NOGROUP, async_client_session, holder.path)
        assert result["ok"] == {"names": ["from-child"]}, result
        settled(holder, base)
        holder.wait_log("deleted 'from-child'")


def test_allowed_gids_are_matched_on_the_primary_group(loop: str) -> None:
    with shared_directory() as directory, holders() as started:
        holder = start(directory, started, loop, "--allow-gid", str(NOGROUP))
        base = baseline(holder)
        admitted = run_as(OTHER, NOGROUP, client_session, holder.path)["ok"]
        assert admitted == {"names": ["from-child"], "same": True}, admitted
        refused = run_as(OTHER, OTHER, client_session, holder.path)["ok"]
        assert f"uid {OTHER}, gid {OTHER}" in refused["refused"], refused
        settled(holder, base)


def test_only_the_holder_s_own_user_may_take_the_store_over(loop: str) -> None:
    with shared_directory() as directory, holders() as started:
        holder = start(directory, started, loop, "--allow-uid", str(NOBODY))
        result = run_as(NOBODY, NOGROUP, takeover_attempt, holder.path)["ok"]
        hello, takeover = result["answers"]
        assert '"op":"hello"' in hello
        assert '"code":"denied"' in takeover
        assert "only the holder's own user" in takeover
        holder.wait_log("refused a takeover by pid")
        with FdHolderBlockingClient.connect(holder.path) as client:
            assert client.list() == []  # not frozen: it answers
