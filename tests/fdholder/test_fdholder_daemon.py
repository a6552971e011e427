"""The fd holder process against real clients: store, retrieve, list, expiry, delete, bounds,
names, peers that break the protocol, SIGTERM, readiness.

Each test runs ``python -m aioancillary fdholder`` on the test's own loop kind (asyncio or
uvloop) and talks to it from this process with the asyncio client (or a raw socket). The
holder's fd count (``/proc/PID/fd``) is checked against its baseline after each step; this
process's own count is checked by the suite's fd fixture. A pipe's write end stored in the
holder proves when the holder's copy is closed: the read end here sees EOF only then.
"""

from __future__ import annotations

import asyncio
import os
import resource
import socket
from pathlib import Path

import pytest
from helpers import wait_until
from helpers.fdholder import (
    WAIT,
    HolderProcess,
    Pipe,
    RawPeer,
    fds_are,
    holders,
    inode,
    loop_name,
    start_holder,
)

from aioancillary import (
    FdHolderClient,
    FdHolderEntry,
    FdHolderError,
    FdHolderExistsError,
    FdHolderFullError,
    FdHolderNotFoundError,
    TooManyFdsError,
)


async def start(tmp_path: Path, started: list[HolderProcess], *options: str) -> HolderProcess:
    return await start_holder(tmp_path / "holder.sock", started, *options)


async def test_retrieved_fds_are_the_same_open_files(tmp_path: Path) -> None:
    with holders() as started, Pipe() as pipe:
        holder = await start(tmp_path, started)
        memfd = os.memfd_create("state")
        try:
            os.write(memfd, b"counter=41")
            async with await FdHolderClient.connect(holder.path) as client:
                base = holder.fd_count()  # with this client's connection, the only one
                assert client.holder_pid == holder.pid
                await client.store("pipe", [pipe.w])
                await client.store("state", memfd)
                assert holder.fd_count() == base + 2
                (w2,) = await client.retrieve("pipe")
                (state,) = await client.retrieve("state")
                with w2, state:
                    assert inode(w2) == inode(pipe.w)
                    assert inode(state) == inode(memfd)
                    os.write(w2.fileno(), b"through the holder's copy")
                    assert os.read(pipe.r, 100) == b"through the holder's copy"
                    # The same open file description: the offset moved for both.
                    assert os.lseek(state.fileno(), 0, os.SEEK_CUR) == len(b"counter=41")
                assert holder.fd_count() == base + 2  # a plain retrieve leaves the entries
                await client.delete("pipe")
                pipe.close_writer()
                await wait_until(pipe.at_eof, WAIT)  # the holder closed its copy
                await client.delete("state")
                assert holder.fd_count() == base
        finally:
            os.close(memfd)


async def test_list_expiry_and_delete(tmp_path: Path) -> None:
    a, b = socket.socketpair()
    with holders() as started, Pipe() as pipe, a, b:
        holder = await start(tmp_path, started)
        async with await FdHolderClient.connect(holder.path) as client:
            base = holder.fd_count()
            await client.store("pair", [a, b])
            await client.store("short lived", pipe.w, timeout=1.0)
            pipe.close_writer()
            entries = await client.list()
            assert [(e.name, e.fd_count) for e in entries] == [("pair", 2), ("short lived", 1)]
            assert entries[0].expires_in is None
            assert entries[1].expires_in is not None
            assert 0 < entries[1].expires_in <= 1.0
            # Expiry closes the holder's copy: the pipe's last writer goes.
            await wait_until(pipe.at_eof, WAIT)
            await holder.log("expired 'short lived': closed its 1 fd(s)")
            assert await client.list() == [FdHolderEntry("pair", 2, None)]
            assert holder.fd_count() == base + 2
            with pytest.raises(FdHolderNotFoundError, match="no entry named 'short lived'"):
                await client.retrieve("short lived")
            await client.delete("pair")
            with pytest.raises(FdHolderNotFoundError):
                await client.delete("pair")
            assert await client.list() == []
            assert holder.fd_count() == base


async def test_a_store_past_the_bounds_is_refused_and_its_fds_closed(tmp_path: Path) -> None:
    with holders() as started, Pipe() as pipe:
        holder = await start(tmp_path, started, "--max-entries", "2", "--max-fds", "3")
        async with await FdHolderClient.connect(holder.path) as client:
            base = holder.fd_count()
            assert (client.max_entries, client.max_fds) == (2, 3)
            await client.store("one", [pipe.r])
            await client.store("two", [pipe.r, pipe.r])
            with pytest.raises(FdHolderFullError, match=r"max_entries=2"):
                await client.store("three", [pipe.w])
            with pytest.raises(FdHolderExistsError, match="already stored"):
                await client.store("one", [pipe.w])
            await client.delete("one")
            with pytest.raises(FdHolderFullError, match=r"holds 2 of at most 3"):
                await client.store("three", [pipe.w, pipe.w])
            await fds_are(holder, base + 2)  # the refused stores' fds were closed
            pipe.close_writer()
            await wait_until(pipe.at_eof, WAIT)  # no copy of the write end survives anywhere
            assert [e.name for e in await client.list()] == ["two"]
            with pytest.raises(TooManyFdsError):
                await client.store("many", [pipe.r] * 254)
            with pytest.raises(ValueError, match="at least one fd"):
                await client.store("none", [])
        await fds_are(holder, base - 1 + 2)  # this client gone, the entry's 2 fds held


@pytest.mark.parametrize("name", ["", "a:b", "caf\u00e9", "tab\there", "x" * 256, "new\nline"])
async def test_bad_names_are_refused_by_client_and_holder(tmp_path: Path, name: str) -> None:
    with holders() as started, Pipe() as pipe:
        holder = await start(tmp_path, started)
        async with await FdHolderClient.connect(holder.path) as client:
            base = holder.fd_count() - 1  # without this client
            with pytest.raises(ValueError, match="name"):
                await client.store(name, [pipe.w])
            with pytest.raises(ValueError, match="name"):
                await client.retrieve(name)
        # A peer that skips the client's checks: the holder refuses and closes the fd.
        with RawPeer(holder.path) as peer:
            answer = peer.request("store", [pipe.w], name=name, timeout=None)
            assert (answer["op"], answer["code"]) == ("error", "name"), answer
            assert peer.request("list") == {"op": "entries", "entries": []}
        pipe.close_writer()
        await wait_until(pipe.at_eof, WAIT)
        await fds_are(holder, base)


async def test_peer_errors_are_answered_and_their_fds_closed(tmp_path: Path) -> None:
    with holders() as started, Pipe() as pipe:
        holder = await start(tmp_path, started)
        w = pipe.w
        with RawPeer(holder.path) as peer:
            base = holder.fd_count() - 1  # without this peer
            cases = [
                (b"not json", [w], "request"),
                (b'{"op": 3}', [w], "request"),
                (b'{"op": "list"}', [w], "fds"),
                (b'{"op": "delete", "name": "x"}', [w, w], "fds"),
                (b'{"op": "store", "name": "x", "timeout": null}', [], "fds"),
                (b'{"op": "store", "name": "x", "timeout": -1}', [w], "request"),
                (b'{"op": "store", "name": "x", "timeout": Infinity}', [w], "request"),
                (b'{"op": "store", "name": 7}', [w], "request"),
                (b'{"op": "retrieve", "name": ["x"]}', [], "request"),
                (b'{"op": "frobnicate"}', [], "request"),
                (b'{"op": "hello", "versions": [1]}', [], "request"),
            ]
            for data, fds, code in cases:
                peer.send(data, fds)
                answer = peer.answer()
                assert (answer["op"], answer["code"]) == ("error", code), (data, answer)
                assert answer["message"]
            assert peer.request("list") == {"op": "entries", "entries": []}
        pipe.close_writer()
        await wait_until(pipe.at_eof, WAIT)  # every fd sent above was closed
        await fds_are(holder, base)


async def test_a_peer_without_a_common_version_or_hello_is_told_and_closed(tmp_path: Path) -> None:
    with holders() as started:
        holder = await start(tmp_path, started)
        with RawPeer(holder.path) as peer:  # its hello answered: the holder accepted it
            base = holder.fd_count() - 1
        with RawPeer(holder.path, hello=False) as peer:
            answer = peer.request("hello", versions=[2, 3])
            assert (answer["op"], answer["code"]) == ("error", "version")
            assert "speaks protocol version(s) [1]" in answer["message"]
            assert peer.at_eof()
        with Pipe() as pipe:
            with RawPeer(holder.path, hello=False) as peer:
                answer = peer.request("store", [pipe.w], name="x")
                assert (answer["op"], answer["code"]) == ("error", "request")
                assert peer.at_eof()
            pipe.close_writer()
            await wait_until(pipe.at_eof, WAIT)
        with RawPeer(holder.path, hello=False) as peer:
            peer.sock.sendall(b"\x07garbage that is not a frame")
            assert peer.at_eof()  # a framing violation ends the connection
        await fds_are(holder, base)
        await holder.log("closed the connection from peer")


async def test_retrieve_with_delete_drops_the_entry_only_once_confirmed(tmp_path: Path) -> None:
    with holders() as started, Pipe() as pipe:
        holder = await start(tmp_path, started)
        async with await FdHolderClient.connect(holder.path) as client:
            base = holder.fd_count()
            await client.store("web", pipe.w)
            # A client that gets the fds and leaves without confirming loses nothing.
            with RawPeer(holder.path) as peer:
                peer.send(b'{"op":"retrieve","name":"web","delete":true}')
                msg = peer.message()
                assert msg is not None
                with msg:
                    assert msg.fd_count == 1
                    assert inode(msg.fds[0]) == inode(pipe.w)
                # Meanwhile the entry is claimed: nobody else may take or delete it.
                with pytest.raises(FdHolderError, match="another client") as caught:
                    await client.retrieve("web", delete=True)
                assert caught.value.code == "busy"
                with pytest.raises(FdHolderError, match="another client"):
                    await client.delete("web")
                (copy,) = await client.retrieve("web")  # a plain retrieve may
                copy.close()
            await holder.log("left before confirming retrieve(delete=True) of ['web']: kept")
            assert [e.name for e in await client.list()] == ["web"]
            (taken,) = await client.retrieve("web", delete=True)
            with taken:
                assert inode(taken) == inode(pipe.w)
                await fds_are(holder, base)
            assert await client.list() == []


async def test_sigterm_drops_the_store_and_says_so(tmp_path: Path) -> None:
    with holders() as started, Pipe() as pipe:
        holder = await start(tmp_path, started)
        async with await FdHolderClient.connect(holder.path) as client:
            await client.store("pipe", pipe.w)
            await client.store("other", [pipe.r, pipe.r])
        pipe.close_writer()
        assert not pipe.at_eof()
        holder.proc.terminate()
        assert await holder.exited() == 0
        line = await holder.log("SIGTERM: dropped the store")
        assert "2 entries (3 fds): 'pipe', 'other'; every fd closed" in line
        assert pipe.at_eof()
        assert not os.path.exists(holder.path)
        assert not os.path.exists(holder.path + ".takeover")


async def test_ready_is_sent_to_the_service_manager(tmp_path: Path) -> None:
    notify_path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager, holders() as started:
        manager.bind(notify_path)
        manager.settimeout(WAIT)
        holder = HolderProcess(
            tmp_path / "holder.sock", loop_name(), env={"NOTIFY_SOCKET": notify_path}
        )
        started.append(holder)
        loop = asyncio.get_running_loop()
        datagram = await loop.run_in_executor(None, manager.recv, 4096)
        assert datagram == b"READY=1\nSTATUS=holding 0 entries"
        await holder.serving_async()
        holder.proc.terminate()
        assert await holder.exited() == 0
        datagram = await loop.run_in_executor(None, manager.recv, 4096)
        assert datagram == b"STOPPING=1\nSTATUS=dropping the store"


async def test_the_holder_refuses_to_start_without_room_for_its_fds(tmp_path: Path) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no hard RLIMIT_NOFILE to exceed")
    with holders() as started:
        holder = HolderProcess(tmp_path / "h.sock", loop_name(), "--max-fds", str(hard))
        started.append(holder)
        assert await holder.exited() == 1
        line = await holder.log("cannot start")
        assert f"hard limit is {hard}: lower --max-fds" in line
        assert not os.path.exists(holder.path)


async def test_a_second_holder_on_a_live_path_of_another_kind_is_refused(tmp_path: Path) -> None:
    # A file that is not a socket: the holder refuses to replace it.
    path = tmp_path / "not-a-socket"
    path.write_text("precious")
    with holders() as started:
        holder = HolderProcess(path, loop_name())
        started.append(holder)
        assert await holder.exited() == 1
        assert "refusing to replace a file that is not a socket" in await holder.log("cannot start")
    assert path.read_text() == "precious"
