"""The ready-made ``authorize=`` policies, as pure functions and against real peers.

The refusal cases need a peer running as another user: a child process that drops to
``nobody`` (``setgroups``/``setgid``/``setuid``, so it needs root) before it connects. It
connects to an abstract-namespace name, which has no file permissions to stop it first
(``unix(7)``): only ``authorize`` decides.
"""

from __future__ import annotations

import asyncio
import grp
import os
import pwd
import subprocess
import sys
import textwrap
import uuid

import pytest
from helpers import within

from aioancillary import (
    AncillaryConnection,
    AncillaryServer,
    Authorize,
    Credentials,
    PeerRejectedError,
    open_unix_connection,
    start_unix_server,
)
from aioancillary._kernel._authorize import (
    allow_gids,
    allow_group_members,
    allow_uids,
    root_or_same_user,
    same_user,
)

ME = os.geteuid()
NOBODY = pwd.getpwnam("nobody")


def creds(uid: int, gid: int = 12345) -> Credentials:
    return Credentials(pid=4242, uid=uid, gid=gid)


# -- pure policies -------------------------------------------------------------------------------


def test_same_user() -> None:
    assert same_user(creds(ME))
    assert not same_user(creds(ME + 1))
    assert not same_user(None)


def test_root_or_same_user() -> None:
    assert root_or_same_user(creds(0))
    assert root_or_same_user(creds(ME))
    assert not root_or_same_user(creds(ME + 1 if ME else 1))
    assert not root_or_same_user(None)


def test_allow_uids_and_gids() -> None:
    by_uid = allow_uids(1000, 1001)
    assert by_uid(creds(1001))
    assert not by_uid(creds(1002, gid=1000))
    assert not by_uid(None)
    by_gid = allow_gids(50)
    assert by_gid(creds(7, gid=50))
    assert not by_gid(creds(50, gid=7))
    assert not by_gid(None)
    assert repr(by_uid) == "allow_uids(1000, 1001)"
    assert repr(by_gid) == "allow_gids(50)"


@pytest.mark.parametrize("factory", [allow_uids, allow_gids])
def test_allow_ids_refuse_bad_arguments(factory: object) -> None:
    assert callable(factory)
    with pytest.raises(ValueError, match="at least one id"):
        factory()
    for bad in ("root", -1, True, 1.0):
        with pytest.raises(TypeError, match="numeric ids"):
            factory(bad)


def test_allow_group_members_by_primary_gid_and_by_membership(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Members listed in the group database are accepted whatever their primary gid."""
    entry = grp.struct_group(("staff", "x", 4321, ["alice", "ghost"]))
    monkeypatch.setattr(grp, "getgrnam", {"staff": entry}.__getitem__)
    monkeypatch.setattr(grp, "getgrgid", {4321: entry}.__getitem__)

    def getpwnam(name: str) -> pwd.struct_passwd:
        if name != "alice":
            raise KeyError(name)  # "ghost" is listed in the group but has no user entry
        return pwd.struct_passwd(("alice", "x", 5000, 5000, "", "/", "/bin/sh"))

    monkeypatch.setattr(pwd, "getpwnam", getpwnam)
    for policy in (allow_group_members("staff"), allow_group_members(4321)):
        assert policy(creds(5000, gid=5000))  # a listed member
        assert policy(creds(6000, gid=4321))  # primary group
        assert not policy(creds(6000, gid=6000))
        assert not policy(None)
        assert repr(policy) == "allow_group_members('staff')"


def test_allow_group_members_unknown_group() -> None:
    with pytest.raises(KeyError):
        allow_group_members(f"no-such-group-{uuid.uuid4().hex[:8]}")


# -- real peers --------------------------------------------------------------------------------

needs_root = pytest.mark.skipif(ME != 0, reason="starting a peer as nobody needs root")

# The interpreter's files may not be readable by nobody (under /root): a child imports what it
# needs, then drops to nobody when its first argument says so.
DROP = textwrap.dedent(
    f"""
    import os, socket, sys
    if sys.argv[2] == "nobody":
        os.setgroups([])
        os.setgid({NOBODY.pw_gid})
        os.setuid({NOBODY.pw_uid})
    """
)

CLIENT = DROP + textwrap.dedent(
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(sys.argv[1].encode("latin-1").replace(b"@", b"\\0", 1))
    sock.settimeout(10)
    try:
        data = sock.recv(100)
    except ConnectionResetError:
        data = b""
    print("answer" if data else "closed", flush=True)
    """
)

SERVER = DROP + textwrap.dedent(
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(sys.argv[1].encode("latin-1").replace(b"@", b"\\0", 1))
    sock.listen()
    print("listening", flush=True)
    conn, _ = sock.accept()
    conn.settimeout(10)
    conn.recv(100)  # until the client hangs up
    """
)


def abstract_name() -> tuple[str, str]:
    """A Linux abstract socket address (leading NUL), and its spelling on a command line."""
    name = f"aioancillary-test-{uuid.uuid4().hex}"
    return "\0" + name, "@" + name


async def run_client(address: str, user: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CLIENT, address, user, stdout=subprocess.PIPE
    )
    out, _ = await within(proc.communicate(), 15)
    assert proc.returncode == 0
    return out.decode().strip()


async def serve(
    address: str, authorize: Authorize
) -> tuple[list[Credentials | None], AncillaryServer]:
    seen: list[Credentials | None] = []

    async def handler(conn: AncillaryConnection) -> None:
        seen.append(conn.peercred)
        await conn.send(b"welcome")

    server = await start_unix_server(handler, address, authorize=authorize)
    return seen, server


@needs_root
@pytest.mark.parametrize(
    "policy",
    [same_user, root_or_same_user, allow_uids(0)],
    ids=["same_user", "root_or_same_user", "allow_uids"],
)
async def test_server_refuses_a_peer_running_as_nobody(policy: Authorize) -> None:
    address, spelled = abstract_name()
    seen, server = await serve(address, policy)
    async with server:
        assert await run_client(spelled, "nobody") == "closed"
        assert await run_client(spelled, "root") == "answer"  # the same server lets root in
    assert [c.uid if c else None for c in seen] == [0]


@needs_root
@pytest.mark.parametrize(
    "policy",
    [
        allow_uids(NOBODY.pw_uid),
        allow_gids(NOBODY.pw_gid),
        allow_group_members(NOBODY.pw_gid),
    ],
    ids=["allow_uids", "allow_gids", "allow_group_members"],
)
async def test_server_accepts_nobody_when_the_policy_names_it(policy: Authorize) -> None:
    address, spelled = abstract_name()
    seen, server = await serve(address, policy)
    async with server:
        assert await run_client(spelled, "nobody") == "answer"
        assert await run_client(spelled, "root") == "closed"  # root is not named: refused
    assert [(c.uid, c.gid) if c else None for c in seen] == [(NOBODY.pw_uid, NOBODY.pw_gid)]


async def test_same_user_accepts_this_process() -> None:
    address, _ = abstract_name()
    seen, server = await serve(address, same_user)
    async with server, await within(open_unix_connection(address, authorize=same_user)) as conn:
        with await within(conn.recv()) as msg:
            assert msg.data == b"welcome"
    assert seen == [Credentials(os.getpid(), ME, os.getegid())]


@needs_root
async def test_client_refuses_a_server_running_as_nobody() -> None:
    address, spelled = abstract_name()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SERVER, spelled, "nobody", stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        assert await within(proc.stdout.readline(), 15) == b"listening\n"
        with pytest.raises(PeerRejectedError):
            await within(open_unix_connection(address, authorize=same_user))
        await within(proc.wait(), 15)  # the child saw the hang-up and exited
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0
