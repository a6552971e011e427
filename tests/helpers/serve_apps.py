"""Applications served by ``python -m aioancillary serve`` in the serve tests (imported in the
workers, and in-process by the adapter tests).

Every HTTP answer carries ``X-Pid`` (the worker's pid). Routes of the ASGI and aiohttp apps:

* ``/``: ``hello``;
* ``/sleep?s=SECONDS``: answers after that long;
* ``/echo`` (POST): the body's length and a checksum, read as a stream (10 MB bodies);
* ``/fds``: the worker's open fd count;
* ``/state``: what the lifespan startup put in the state (ASGI) / ``on_startup`` (aiohttp).
"""

from __future__ import annotations

import asyncio
import os
import zlib
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]

#: Set by lifespan startup and shutdown (a file per worker, when SERVE_TEST_EVENTS is a dir).
EVENTS_DIR = "SERVE_TEST_EVENTS"


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd")) - 1


def _fail_startup() -> bool:
    """Told to fail: ``SERVE_TEST_FAIL_STARTUP`` set, or naming a file that exists."""
    value = os.environ.get("SERVE_TEST_FAIL_STARTUP", "")
    return value == "1" or (bool(value) and os.path.exists(value))


def _record(event: str) -> None:
    directory = os.environ.get(EVENTS_DIR)
    if directory:
        with open(os.path.join(directory, f"{os.getpid()}.{event}"), "w") as f:
            f.write(event)


async def _respond(
    send: Callable[[Message], Awaitable[None]], body: bytes, status: int = 200
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain"),
                (b"content-length", str(len(body)).encode()),
                (b"x-pid", str(os.getpid()).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def app(
    scope: Scope,
    receive: Callable[[], Awaitable[Message]],
    send: Callable[[Message], Awaitable[None]],
) -> None:
    """The ASGI test application."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                _record("startup")
                if _fail_startup():
                    await send({"type": "lifespan.startup.failed", "message": "told to fail"})
                    return
                scope["state"]["started"] = os.getpid()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                _record("shutdown")
                await send({"type": "lifespan.shutdown.complete"})
                return
    path = scope["path"]
    if path == "/sleep":
        seconds = float(parse_qs(scope["query_string"].decode()).get("s", ["0.5"])[0])
        await asyncio.sleep(seconds)
        await _respond(send, b"slept")
    elif path == "/echo":
        size, crc, more = 0, 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                _record("disconnect")
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            crc = zlib.crc32(chunk, crc)
            more = message.get("more_body", False)
        await _respond(send, f"{size} {crc}".encode())
    elif path == "/fds":
        await _respond(send, str(fd_count()).encode())
    elif path == "/state":
        await _respond(send, str(scope.get("state", {}).get("started")).encode())
    else:
        await _respond(send, b"hello")


def make_aiohttp_app() -> Any:
    """The aiohttp test application (a factory: each worker makes its own)."""
    from aiohttp import web  # noqa: PLC0415 - only where aiohttp is installed

    STARTED = web.AppKey("started", int)

    def reply(body: str) -> web.Response:
        return web.Response(text=body, headers={"X-Pid": str(os.getpid())})

    async def hello(request: web.Request) -> web.Response:
        return reply("hello")

    async def sleep(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("s", "0.5")))
        return reply("slept")

    async def echo(request: web.Request) -> web.Response:
        size, crc = 0, 0
        try:
            async for chunk in request.content.iter_any():
                size += len(chunk)
                crc = zlib.crc32(chunk, crc)
        except ConnectionError:
            _record("disconnect")  # nobody to answer
        return reply(f"{size} {crc}")

    async def fds(request: web.Request) -> web.Response:
        return reply(str(fd_count()))

    async def state(request: web.Request) -> web.Response:
        return reply(str(request.app.get(STARTED)))

    async def on_startup(application: web.Application) -> None:
        _record("startup")
        if _fail_startup():
            raise RuntimeError("told to fail")
        application[STARTED] = os.getpid()

    async def on_cleanup(application: web.Application) -> None:
        _record("shutdown")

    application = web.Application()
    application.router.add_get("/", hello)
    application.router.add_get("/sleep", sleep)
    application.router.add_post("/echo", echo)
    application.router.add_get("/fds", fds)
    application.router.add_get("/state", state)
    application.on_startup.append(on_startup)
    application.on_cleanup.append(on_cleanup)
    return application


class EchoProtocol(asyncio.Protocol):
    """The ``protocol`` interface: echoes each line with the worker's pid in front."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            self.transport.write(f"{os.getpid()} ".encode() + line + b"\n")  # type: ignore[attr-defined]


async def echo_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The ``handler`` interface: echoes each line with the worker's pid in front."""
    while line := await reader.readline():
        writer.write(f"{os.getpid()} ".encode() + line)
        await writer.drain()


def worker_init() -> None:
    """A ``--worker-init`` function: leaves a mark the app can see."""
    os.environ["SERVE_TEST_INIT"] = str(os.getpid())
    _record("init")
