"""The options of ``python -m aioancillary serve``: parsed once in the runner, passed to every
worker as JSON (`PoolWorker.args`)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from typing import Any, Literal

__all__ = ["INTERFACES", "Bind", "ServeOptions", "add_arguments", "parse_bind"]

INTERFACES = ("asgi", "aiohttp", "protocol", "handler")
#: The interfaces that speak HTTP: the client speaks first (see `ServeOptions.defer_accept`),
#: and their stop closes connections between requests.
HTTP_INTERFACES = ("asgi", "aiohttp")
DEFAULT_BIND = "127.0.0.1:8000"

_NAMED = re.compile(r"^([A-Za-z0-9_.@-]+)=(.+)$")


@dataclasses.dataclass(frozen=True)
class Bind:
    """One ``--bind``: an address to listen on, and the name of an inherited socket to use
    instead when the service manager passed one (``LISTEN_FDNAMES``).

    Attributes:
        text: As given on the command line (without the name).
        family: ``AF_INET``, ``AF_INET6`` or ``AF_UNIX`` (as ``socket`` module integers).
        host: The host (IPv4/IPv6 address or name), or the path for ``unix:``.
        port: The TCP port (0 for ``unix:``).
        name: The ``NAME=`` prefix, or ``None``.
    """

    text: str
    family: int
    host: str
    port: int
    name: str | None = None

    @property
    def is_unix(self) -> bool:
        import socket  # noqa: PLC0415 - keeps this module's import light

        return self.family == socket.AF_UNIX


def parse_bind(text: str) -> Bind:
    """Parse ``[NAME=]HOST:PORT``, ``[NAME=][V6ADDR]:PORT`` or ``[NAME=]unix:PATH``.

    Raises:
        ValueError: the text is none of these (the message says what is accepted).
    """
    import socket  # noqa: PLC0415

    name = None
    match = _NAMED.match(text)
    if match and not text.startswith("unix:"):
        name, text = match.group(1), match.group(2)
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path:
            raise ValueError("unix: needs a path, e.g. unix:/run/app.sock")
        return Bind(text, socket.AF_UNIX, path, 0, name)
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(
            f"--bind {text!r}: expected HOST:PORT, [IPV6]:PORT or unix:PATH "
            "(optionally NAME= in front, the name of a socket passed by systemd)"
        )
    family = socket.AF_INET
    if host.startswith("[") and host.endswith("]"):
        host, family = host[1:-1], socket.AF_INET6
    elif ":" in host:
        raise ValueError(f"--bind {text!r}: write an IPv6 address in brackets: [{host}]:PORT")
    return Bind(text, family, host or "0.0.0.0", int(port_text), name)


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    """Everything the runner and its workers need to know."""

    app: str
    interface: Literal["asgi", "aiohttp", "protocol", "handler"] = "asgi"
    binds: tuple[str, ...] = ()
    workers: int = 1
    loop: Literal["asyncio", "uvloop"] = "asyncio"
    http: str = "auto"
    worker_init: str | None = None
    graceful_timeout: float = 30.0
    keep_alive: float = 5.0
    backlog: int = 2048
    access_log: bool = False
    log_level: str = "info"
    lifespan: str = "auto"
    accept: Literal["runner", "workers"] = "runner"
    cwd: str = dataclasses.field(default_factory=os.getcwd)

    @property
    def defer_accept(self) -> bool:
        """Whether the TCP listeners get ``TCP_DEFER_ACCEPT`` (``accept()`` returns a client
        once its first bytes are in): for HTTP, when the runner accepts.

        There it saves the runner a wake-up per connection, and the worker gets the socket
        with its request already in. With ``--accept workers`` it is left off: on two workers
        accepting for themselves, a new connection per request cost them 60-72 µs of CPU with
        it against 61-63 µs without (``/proc/PID/stat``, interleaved runs; gunicorn's workers:
        55-65 µs).
        """
        return self.interface in HTTP_INTERFACES and self.accept == "runner"

    def to_json(self) -> dict[str, Any]:
        """For the workers (``WorkerPool(args=...)``)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ServeOptions:
        """Back from `to_json` (in a worker)."""
        data = dict(data)
        data["binds"] = tuple(data.get("binds", ()))
        return cls(**data)


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (workers, counts, limits)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _bind(text: str) -> str:
    try:
        parse_bind(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _reference(text: str) -> str:
    module, sep, attr = text.partition(":")
    if not sep or not module or not attr:
        raise argparse.ArgumentTypeError(f"expected MODULE:NAME, got {text!r}")
    return text


def add_arguments(parser: argparse.ArgumentParser, default_loop: str) -> None:
    """The ``serve`` subcommand's arguments."""
    parser.add_argument(
        "app",
        type=_reference,
        metavar="MODULE:APP",
        help="the application, imported in every worker (from the current directory too)",
    )
    parser.add_argument(
        "--interface",
        choices=INTERFACES,
        default="asgi",
        help="asgi (an ASGI app, through uvicorn's HTTP protocol), aiohttp (a "
        "web.Application, or a function that returns one), protocol (an asyncio Protocol "
        "factory) or handler (async def handler(reader, writer)); default asgi",
    )
    parser.add_argument(
        "-b",
        "--bind",
        dest="binds",
        action="append",
        type=_bind,
        metavar="ADDRESS",
        help="HOST:PORT, [IPV6]:PORT or unix:PATH, repeatable; NAME=ADDRESS takes the socket "
        "systemd passed under that name when there is one (default: the sockets systemd "
        f"passed, or {DEFAULT_BIND})",
    )
    parser.add_argument(
        "-w", "--workers", type=positive_int, default=1, metavar="N", help="default 1"
    )
    parser.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        default=default_loop,
        help=f"event loop of the runner and its workers (default {default_loop})",
    )
    parser.add_argument(
        "--http",
        choices=("auto", "httptools", "h11"),
        default="auto",
        help="asgi: uvicorn's HTTP implementation (default auto: httptools when installed)",
    )
    parser.add_argument(
        "--accept",
        choices=("runner", "workers"),
        default="runner",
        help="who accepts connections: runner (the runner accepts and hands each one to the "
        "least busy worker) or workers (every worker accepts on the shared listening sockets, "
        "as under gunicorn: less CPU per new connection, no choice of worker); default runner",
    )
    parser.add_argument(
        "--worker-init",
        type=_reference,
        metavar="MODULE:FUNC",
        help="called (and awaited if it returns an awaitable) in each worker before the "
        "application is imported",
    )
    parser.add_argument(
        "--graceful-timeout",
        type=_seconds,
        default=30.0,
        metavar="SECONDS",
        help="how long stopping workers may take to finish their requests (default 30)",
    )
    parser.add_argument(
        "--keep-alive",
        type=_seconds,
        default=5.0,
        metavar="SECONDS",
        help="asgi/aiohttp: how long an idle keep-alive connection stays open (default 5)",
    )
    parser.add_argument(
        "--backlog",
        type=positive_int,
        default=2048,
        metavar="N",
        help="listen() backlog of the sockets the runner binds (default 2048)",
    )
    parser.add_argument("--access-log", action="store_true", help="asgi/aiohttp: log every request")
    parser.add_argument(
        "--lifespan",
        choices=("auto", "on", "off"),
        default="auto",
        help="asgi: run the application's lifespan (default auto: if it supports it)",
    )
    parser.add_argument(
        "--log-level",
        choices=("critical", "error", "warning", "info", "debug"),
        default="info",
        help="default info",
    )


def from_namespace(args: argparse.Namespace) -> ServeOptions:
    """The options of a parsed ``serve`` command line."""
    return ServeOptions(
        app=args.app,
        interface=args.interface,
        binds=tuple(args.binds or ()),
        workers=args.workers,
        loop=args.loop,
        http=args.http,
        worker_init=args.worker_init,
        graceful_timeout=args.graceful_timeout,
        keep_alive=args.keep_alive,
        backlog=args.backlog,
        access_log=args.access_log,
        log_level=args.log_level,
        lifespan=args.lifespan,
        accept=args.accept,
    )
