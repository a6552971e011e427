"""The command line: ``aioancillary {demo,bench,fdholder,serve} ...``, the same as
``python -m aioancillary``.

Conventions: ``--help`` prints to stdout and exits 0; a usage error (an unknown option, a
missing command) prints to stderr and exits 2, as argparse does. Running with no command is
a usage error too: the help goes to stderr and the exit status is 2, so that a script that
forgot its command fails instead of passing silently.

In a pipe whose reader leaves early (``aioancillary demo | head -1``) the command ends as a C
program does: quietly, killed by ``SIGPIPE`` (the shell reports status 141), with no
traceback. Python ignores ``SIGPIPE`` and raises `BrokenPipeError` instead; that error, from
standard output only, is turned back into the signal once the command has cleaned up (the
demo's child process stopped, its sockets closed).
"""

from __future__ import annotations

import argparse
import os
import platform
import select
import signal
import sys
from typing import Any, NoReturn

from .._core._version import __version__
from .._kernel import _accel
from .._serve._options import positive_int
from ._output import OutputClosed

PROG = "python -m aioancillary"
SCRIPT = "aioancillary"  # the console script ([project.scripts] in pyproject.toml)
LOOPS = ("asyncio", "uvloop")
UVLOOP_MISSING = "uvloop is not installed (pip install 'aioancillary[uvloop]')"


def _has_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401, PLC0415 - optional: importable means usable
    except ImportError:
        return False
    return True


def _version() -> str:
    uvloop = "not installed"
    if _has_uvloop():
        from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

        try:
            uvloop = version("uvloop")
        except PackageNotFoundError:
            uvloop = "installed"
    return (
        f"aioancillary {__version__} "
        f"(CPython {platform.python_version()}, {platform.system()}; uvloop {uvloop}; "
        f"hot paths: {_accel.PATH})"
    )


class _VersionAction(argparse.Action):
    """``--version`` on one line: argparse's own wraps it to the terminal's width."""

    def __init__(self, option_strings: list[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *_args: object) -> None:
        print(_version())
        parser.exit()


def _parser(prog: str) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="aioancillary: leak-proof, asyncio-native fd passing over Unix sockets.",
        epilog=f"Run '{prog} COMMAND --help' for a command's options. "
        "Documentation: https://aioancillary.readthedocs.io",
    )
    parser.add_argument(
        "-V", "--version", action=_VersionAction, help="show the version and the path in use"
    )
    commands = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="watch a live TCP connection move from one process to another",
        description="Process A accepts a TCP client on 127.0.0.1 and hands the connection to "
        "process B over a Unix socket; B answers the client. Both processes narrate each step "
        "and count their open fds to show that nothing leaked.",
    )
    demo.add_argument(
        "--loop",
        choices=LOOPS,
        help="event loop of both processes (default: uvloop if installed, else asyncio)",
    )

    bench = commands.add_parser(
        "bench",
        help="a quick benchmark against the stdlib's blocking send_fds/recv_fds",
        description="Runs a few cells (stream 1 fd framed, seqpacket 1 fd, ping-pong), each in "
        "two fresh processes, and prints each implementation's rate against the stdlib's "
        "blocking socket.send_fds/recv_fds measured in the same run. Progress goes to stderr, "
        "the table to stdout. Takes about half a minute with the defaults.",
    )
    bench.add_argument(
        "--loop",
        choices=(*LOOPS, "all"),
        default="all",
        help="loops to measure aioancillary on (default: all, uvloop only if installed)",
    )
    bench.add_argument(
        "-n",
        "--messages",
        type=positive_int,
        default=50_000,
        metavar="N",
        help="messages per throughput cell; ping-pong makes N/10 round trips (default 50000)",
    )
    bench.add_argument(
        "--repeat",
        type=positive_int,
        default=3,
        metavar="R",
        help="runs of every cell, interleaved; the best is shown (default 3)",
    )
    return parser, {
        "demo": demo,
        "bench": bench,
        "fdholder": _fdholder_parser(commands),
        "serve": _serve_parser(commands),
    }


def _fdholder_parser(commands: Any) -> argparse.ArgumentParser:
    from ._fdholder_cmd import account  # noqa: PLC0415 - a few lines; the holder loads on use

    fdholder = commands.add_parser(
        "fdholder",
        help="hold fds across restarts: run the fd holder, or list and delete its entries",
        description="Without ACTION: run the fd holder on --socket until SIGTERM (which drops "
        "the store). A holder started on the socket of a running one takes its whole store "
        "over, and the running one exits. With ACTION: talk to the holder on --socket.",
        epilog="--socket defaults to $AIOANCILLARY_FDHOLDER_SOCKET; '@name' is an abstract "
        "socket. The holder admits its own user and root, plus --allow-uid/--allow-gid.",
    )
    fdholder.add_argument("--socket", metavar="PATH", help="the holder's socket")
    fdholder.add_argument(
        "--allow-uid",
        metavar="UID",
        type=account("uid"),
        action="append",
        default=[],
        help="also admit this user (number or name; repeat for several)",
    )
    fdholder.add_argument(
        "--allow-gid",
        metavar="GID",
        type=account("gid"),
        action="append",
        default=[],
        help="also admit processes of this primary group (number or name; repeat)",
    )
    fdholder.add_argument(
        "--loop",
        choices=LOOPS,
        help="the holder's event loop (default: uvloop if installed, else asyncio)",
    )
    fdholder.add_argument(
        "--max-entries", type=positive_int, default=1000, metavar="N", help="default 1000"
    )
    fdholder.add_argument(
        "--max-fds",
        type=positive_int,
        default=1000,
        metavar="N",
        help="fds held, all entries together (default 1000)",
    )
    actions = fdholder.add_subparsers(dest="action", title="actions", metavar="ACTION")
    listing = actions.add_parser("list", help="list the entries: fd count, expiry, name")
    listing.add_argument("--socket", metavar="PATH", default=argparse.SUPPRESS)
    delete = actions.add_parser("delete", help="drop an entry: the holder closes its fds")
    delete.add_argument("name", help="the entry's name")
    delete.add_argument("--socket", metavar="PATH", default=argparse.SUPPRESS)
    return fdholder  # type: ignore[no-any-return]


def _serve_parser(commands: Any) -> argparse.ArgumentParser:
    from .._serve import _options  # noqa: PLC0415 - argument definitions only (no app import)

    serve = commands.add_parser(
        "serve",
        help="serve an ASGI, aiohttp or asyncio application with worker processes",
        description="The runner: this process accepts clients and hands each connection to "
        "the least busy of N worker processes (fresh interpreters) that serve the "
        "application. Signals: HUP reloads (new workers with new code, old ones finish what "
        "they hold: no client refused or lost), TERM/INT stop gracefully, TTIN/TTOU add or "
        "remove a worker. Under systemd: listeners from LISTEN_FDS, and READY/RELOADING/"
        "STOPPING/STATUS/watchdog notifications.",
    )
    _options.add_arguments(serve, default_loop="uvloop" if _has_uvloop() else "asyncio")
    return serve  # type: ignore[no-any-return]


def _bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``bench``: progress on stderr, the table on stdout; exit 1 if a cell failed."""
    from . import _bench  # noqa: PLC0415 - loaded only by the command that uses it

    if args.loop == "all":
        loops = ["asyncio", "uvloop"] if _has_uvloop() else ["asyncio"]
    else:
        loops = [args.loop]
    if "uvloop" in loops and not _has_uvloop():
        parser.error(f"--loop uvloop: {UVLOOP_MISSING}")
    total = len(_bench.make_cells(loops)) * args.repeat
    print(_bench.describe(loops, args.messages, args.repeat), end="\n\n", flush=True)
    progress = _bench.Progress(total, sys.stderr)
    results, errors = _bench.run_all(loops, args.messages, args.repeat, progress)
    print(_bench.table(results, errors, loops))
    if "uvloop" not in loops and args.loop == "all":
        print(f"\nuvloop was not measured: {UVLOOP_MISSING}.")
    for cell, error in errors.items():
        print(f"{cell.label} failed: {error}", file=sys.stderr)
    return 1 if errors else 0


def _stdout_closed() -> bool:
    """Whether standard output is a pipe or socket nobody reads any more (poll says POLLERR)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(event & select.POLLERR for _, event in poller.poll(0))
    except (OSError, ValueError):
        return False


def _die_of_sigpipe() -> NoReturn:
    """End as a C program whose reader left: killed by SIGPIPE, nothing printed."""
    sys.stderr.flush()
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # Python starts with SIGPIPE ignored
    os.kill(os.getpid(), signal.SIGPIPE)
    os._exit(128 + signal.SIGPIPE)  # not reached: the signal ends the process


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """Entry point of ``python -m aioancillary``; returns the exit status."""
    try:
        return _run(sys.argv[1:] if argv is None else argv, prog)
    except OutputClosed:
        _die_of_sigpipe()
    except BrokenPipeError:
        if _stdout_closed():
            _die_of_sigpipe()
        raise


def console_main() -> int:
    """Entry point of the ``aioancillary`` console script."""
    return main(sys.argv[1:], SCRIPT)


def _run(argv: list[str], prog: str) -> int:
    if argv[:1] == ["demo-worker"]:
        # Internal: process B of the demo, started by the demo itself (not in --help).
        from ._demo import worker_main  # noqa: PLC0415

        return worker_main(argv[1:])
    parser, commands = _parser(prog)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.command == "demo":
        if args.loop == "uvloop" and not _has_uvloop():
            commands["demo"].error(f"--loop uvloop: {UVLOOP_MISSING}")
        from ._demo import demo  # noqa: PLC0415 - the demo's modules load only when it runs

        return demo(args.loop or ("uvloop" if _has_uvloop() else "asyncio"))
    if args.command == "fdholder":
        from ._fdholder_cmd import fdholder  # noqa: PLC0415

        if args.action is None and args.loop == "uvloop" and not _has_uvloop():
            commands["fdholder"].error(f"--loop uvloop: {UVLOOP_MISSING}")
        default_loop = "uvloop" if _has_uvloop() else "asyncio"
        return fdholder(args, commands["fdholder"], default_loop)
    if args.command == "serve":
        return _serve(args, commands["serve"])
    return _bench(args, commands["bench"])


def _serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``serve``: the runner (see `aioancillary._serve._runner`)."""
    from .._serve import _options, _runner  # noqa: PLC0415 - loaded only when serving

    if args.loop == "uvloop" and not _has_uvloop():
        parser.error(f"--loop uvloop: {UVLOOP_MISSING}")
    return _runner.run(_options.from_namespace(args))
