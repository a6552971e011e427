"""``python -m aioancillary fdholder``: run the fd holder, or list and delete its entries.

The parser lives in ``_cli``; this module runs what it parsed. ``list`` prints one line per
entry with the name last (names may hold spaces), so that ``split(maxsplit=2)`` reads it::

    FDS  EXPIRES  NAME
      1    never  web
      2    29.5s  state files

Exit status: 0 done; 1 the holder refused (no such entry...) or cannot be reached; 2 a
usage error.
"""

from __future__ import annotations

import argparse
import grp
import os
import pwd
import sys
from collections.abc import Callable

from .._core._errors import AncillaryError

__all__ = ["ENV_SOCKET", "account", "fdholder"]

#: Where ``--socket`` comes from when it is not given.
ENV_SOCKET = "AIOANCILLARY_FDHOLDER_SOCKET"


def account(kind: str) -> Callable[[str], int]:
    """An argparse type for ``--allow-uid`` (``kind="uid"``) or ``--allow-gid``: a number, or
    a user or group name looked up now."""

    def parse(text: str) -> int:
        if text.isdigit():
            return int(text)
        try:
            if kind == "uid":
                return pwd.getpwnam(text).pw_uid
            return grp.getgrnam(text).gr_gid
        except KeyError:
            what = "user" if kind == "uid" else "group"
            raise argparse.ArgumentTypeError(f"no {what} named {text!r}") from None

    parse.__name__ = kind  # argparse names the type in its error messages
    return parse


def _socket_path(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    path: str | None = args.socket or os.environ.get(ENV_SOCKET)
    if not path:
        parser.error(f"give the holder's socket with --socket PATH (or set ${ENV_SOCKET})")
    if path.startswith("@"):
        return "\0" + path[1:]  # unix(7): an abstract name starts with a NUL byte
    return path


def _expiry(seconds: float | None) -> str:
    return "never" if seconds is None else f"{seconds:.1f}s"


def _list(path: str) -> int:
    from .._fdholder._blocking import FdHolderBlockingClient  # noqa: PLC0415

    with FdHolderBlockingClient.connect(path) as holder:
        entries = holder.list()
    print(f"{'FDS':>3}  {'EXPIRES':>7}  NAME")
    for entry in entries:
        print(f"{entry.fd_count:>3}  {_expiry(entry.expires_in):>7}  {entry.name}")
    return 0


def _delete(path: str, name: str) -> int:
    from .._fdholder._blocking import FdHolderBlockingClient  # noqa: PLC0415

    with FdHolderBlockingClient.connect(path) as holder:
        holder.delete(name)
    print(f"deleted {name!r}")
    return 0


def fdholder(args: argparse.Namespace, parser: argparse.ArgumentParser, default_loop: str) -> int:
    """Run the ``fdholder`` command parsed into ``args``; return the exit status."""
    path = _socket_path(args, parser)
    if args.action is None:
        from .._fdholder._daemon import HolderConfig, run  # noqa: PLC0415

        try:
            config = HolderConfig(
                path,
                allow_uids=frozenset(args.allow_uid),
                allow_gids=frozenset(args.allow_gid),
                max_entries=args.max_entries,
                max_fds=args.max_fds,
            )
        except ValueError as exc:
            parser.error(str(exc))
        return run(config, args.loop or default_loop)
    try:
        if args.action == "list":
            return _list(path)
        try:
            return _delete(path, args.name)
        except ValueError as exc:  # a name the holder could never hold: nothing was sent
            parser.error(str(exc))
    except (AncillaryError, OSError) as exc:
        print(f"fdholder {args.action}: {exc}", file=sys.stderr)
        return 1
