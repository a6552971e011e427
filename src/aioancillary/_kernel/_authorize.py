"""Ready-made ``authorize=`` policies for [`start_unix_server`][aioancillary.start_unix_server] and
[`open_unix_connection`][aioancillary.open_unix_connection].

Each policy is an [`Authorize`][aioancillary.Authorize] callable: it gets the peer's credentials,
recorded by the kernel when the connection was made (``SO_PEERCRED`` on Linux, ``LOCAL_PEERCRED`` on
macOS and FreeBSD, see ``unix(7)``), and returns true to let the peer in. The uid and gid are the
peer's *effective* ids, which the peer cannot forge; the pid is only a hint (it can be reused after
the peer exits), so no policy here looks at it.

Every policy refuses ``None``: the credentials of a platform that cannot tell who the peer is.
To let such peers in anyway, say so in your own callable, e.g.
``authorize=lambda creds: creds is None or same_user(creds)``.

The module imports nothing heavy: the user and group databases (`pwd`, `grp`) are read only by
[`allow_group_members`][aioancillary.allow_group_members], once, when the policy is made.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from .._core._cmsg import Credentials

__all__ = [
    "CLIENT_DEFAULT",
    "SERVER_DEFAULT",
    "Authorize",
    "UnprotectedOnly",
    "allow_gids",
    "allow_group_members",
    "allow_uids",
    "root_or_same_user",
    "same_user",
]

#: ``authorize(credentials) -> bool``: decides, before any fd moves, whether a peer may talk.
#: ``credentials`` is ``None`` where the platform cannot tell.
Authorize = Callable[[Credentials | None], bool]


def same_user(credentials: Credentials | None) -> bool:
    """Accept a peer running as this process's effective user; refuse anyone else.

    Read this process's effective uid on every call, so a process that changes user after
    starting its server applies the new one.

    Args:
        credentials: The peer's credentials, or ``None`` where the platform cannot tell.

    Returns:
        True if the peer's effective uid is ours; false otherwise, and for ``None``.

    Example::

        server = await start_unix_server(handler, path, authorize=same_user)
    """
    return credentials is not None and credentials.uid == os.geteuid()


def root_or_same_user(credentials: Credentials | None) -> bool:
    """Accept a peer running as root (uid 0) or as this process's effective user.

    The policy of a daemon that its own user and the administrator may talk to.

    Args:
        credentials: The peer's credentials, or ``None`` where the platform cannot tell.

    Returns:
        True if the peer's effective uid is 0 or ours; false otherwise, and for ``None``.
    """
    return credentials is not None and credentials.uid in (0, os.geteuid())


@dataclass(frozen=True, repr=False)
class _AllowIds:
    """Accept peers whose effective uid (or gid) is one of ``ids``."""

    name: str
    field: str
    ids: frozenset[int]

    def __call__(self, credentials: Credentials | None) -> bool:
        if credentials is None:
            return False
        return getattr(credentials, self.field) in self.ids

    def __repr__(self) -> str:
        return f"{self.name}({', '.join(map(str, sorted(self.ids)))})"


def _ids(name: str, ids: tuple[int, ...]) -> frozenset[int]:
    if not ids:
        raise ValueError(f"{name}() needs at least one id: with none it would refuse everyone")
    for value in ids:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise TypeError(f"{name}() takes numeric ids (non-negative ints), got {value!r}")
    return frozenset(ids)


def allow_uids(*uids: int) -> Authorize:
    """Accept peers whose effective uid is one of ``uids``.

    Args:
        *uids: Numeric user ids (look names up with ``pwd.getpwnam(name).pw_uid``).

    Returns:
        An [`Authorize`][aioancillary.Authorize] callable; it refuses ``None`` credentials.

    Raises:
        ValueError: No uid was given.
        TypeError: An id is not a non-negative int.

    Example::

        authorize = allow_uids(0, pwd.getpwnam("www-data").pw_uid)
    """
    return _AllowIds("allow_uids", "uid", _ids("allow_uids", uids))


def allow_gids(*gids: int) -> Authorize:
    """Accept peers whose effective (primary) gid is one of ``gids``.

    The kernel records only the peer's effective gid, not its supplementary groups: a user who is a
    member of a group through ``/etc/group`` but runs with another primary group is refused. Use
    [`allow_group_members`][aioancillary.allow_group_members] to accept the group's listed members
    too.

    Args:
        *gids: Numeric group ids.

    Returns:
        An [`Authorize`][aioancillary.Authorize] callable; it refuses ``None`` credentials.

    Raises:
        ValueError: No gid was given.
        TypeError: An id is not a non-negative int.
    """
    return _AllowIds("allow_gids", "gid", _ids("allow_gids", gids))


@dataclass(frozen=True, repr=False)
class _AllowGroupMembers:
    group: str
    gid: int
    member_uids: frozenset[int]

    def __call__(self, credentials: Credentials | None) -> bool:
        if credentials is None:
            return False
        return credentials.gid == self.gid or credentials.uid in self.member_uids

    def __repr__(self) -> str:
        return f"allow_group_members({self.group!r})"


def allow_group_members(group: str | int) -> Authorize:
    """Accept peers whose effective gid is ``group``'s, or whose user is a listed member of it.

    The group and its members are looked up in the group and user databases (``grp``, ``pwd``:
    ``/etc/group`` and whatever NSS adds) once, now: the policy itself then compares numbers
    only, so it never blocks the event loop on a directory service. Membership changes take
    effect when the policy is made again (typically at the server's next start).

    The kernel does not record the peer's supplementary groups, so membership comes from the
    database, not from the peer process: a member whose process dropped the group (``setgroups``)
    is still accepted, and a process given the group only by ``setgroups`` is refused unless
    it is its primary group.

    Args:
        group: A group name or numeric gid.

    Returns:
        An [`Authorize`][aioancillary.Authorize] callable; it refuses ``None`` credentials.

    Raises:
        KeyError: No such group.

    Example::

        server = await start_unix_server(handler, path, mode=0o660,
                                         authorize=allow_group_members("workers"))
    """
    import grp  # noqa: PLC0415 - read only when this policy is made
    import pwd  # noqa: PLC0415

    entry = grp.getgrgid(group) if isinstance(group, int) else grp.getgrnam(group)
    uids = set()
    for name in entry.gr_mem:
        try:
            uids.add(pwd.getpwnam(name).pw_uid)
        except KeyError:
            continue  # a member listed in /etc/group with no user entry: nobody to accept
    return _AllowGroupMembers(entry.gr_name, entry.gr_gid, frozenset(uids))


@dataclass(frozen=True, repr=False)
class UnprotectedOnly:
    """The default ``authorize=`` of the entry points: ``policy`` where no file permission
    protects the socket, nobody else checked where one does.

    A socket file's mode (``0o600`` by default) decides who may connect to it (``unix(7)``);
    a Linux abstract name has no file and no permissions, and a socket handed in with
    ``sock=`` has whatever mode its creator chose: there, ``policy`` decides instead. Called
    directly (a caller's own code may wrap it), it applies ``policy``.
    """

    policy: Authorize

    def __call__(self, credentials: Credentials | None) -> bool:
        return self.policy(credentials)

    def __repr__(self) -> str:
        name = getattr(self.policy, "__name__", repr(self.policy))
        return f"<{name} where no file permission protects the socket>"


#: Servers: let in only this user where the socket's permissions cannot keep others out.
SERVER_DEFAULT = UnprotectedOnly(same_user)
#: Clients: on an abstract name (which anyone may have bound first), talk only to a server
#: running as this user or as root (who is beyond any check a client can make).
CLIENT_DEFAULT = UnprotectedOnly(root_or_same_user)
