"""A small HTTP/1.1 load client for the serve tests: every request's outcome is counted.

Each of ``connections`` tasks sends requests one after the other, on one keep-alive
connection (``mode="keep-alive"``: a new one only after a response that says
``Connection: close``) or on a new connection per request (``mode="close"``). Nothing is
retried: a request whose connection is refused, reset, or ends before its full response is
a failure, recorded with when its connection was opened (the TERM tests allow failures only
on connections opened after the stop began).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections import Counter


@dataclasses.dataclass
class Failure:
    kind: str  # "refused", "reset", "eof" (ended before the full response), "timeout",
    # "status", "connect" (connect() failed otherwise)
    detail: str
    opened: float  # time.monotonic() when its connection was opened (or tried)
    requests_before: int  # requests this connection had answered before


@dataclasses.dataclass
class LoadResult:
    ok: int = 0
    failures: list[Failure] = dataclasses.field(default_factory=list)
    connections: int = 0
    closes: int = 0  # responses that said Connection: close
    servers: Counter[str] = dataclasses.field(default_factory=Counter)  # X-Pid header values

    def kinds(self) -> Counter[str]:
        return Counter(f.kind for f in self.failures)


class ResponseError(Exception):
    pass


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response (content-length or chunked body)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise ResponseError(f"bad status line {lines[0]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += chunk[:-2]
    else:
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(parts[1]), headers, body


def request(path: str = "/", *, close: bool = False, body: bytes = b"") -> bytes:
    method = "POST" if body else "GET"
    head = f"{method} {path} HTTP/1.1\r\nHost: test\r\n"
    if body:
        head += f"Content-Length: {len(body)}\r\n"
    if close:
        head += "Connection: close\r\n"
    return head.encode() + b"\r\n" + body


class HttpLoad:
    """Continuous load until :meth:`stop`; :attr:`result` counts every request."""

    def __init__(
        self,
        address: tuple[str, int] | str,
        *,
        connections: int = 8,
        mode: str = "keep-alive",
        path: str = "/",
        timeout: float = 30.0,
    ) -> None:
        self.address = address
        self.connections = connections
        self.mode = mode
        self.path = path
        self.timeout = timeout
        self.result = LoadResult()
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._stopping = False
        self._tasks = [asyncio.ensure_future(self._run()) for _ in range(self.connections)]

    async def stop(self) -> LoadResult:
        self._stopping = True
        await asyncio.gather(*self._tasks)
        return self.result

    async def wait_ok(self, count: int, timeout: float = 60.0) -> None:
        """Wait until ``count`` more requests succeeded."""
        target = self.result.ok + count
        deadline = time.monotonic() + timeout
        while self.result.ok < target:
            if time.monotonic() > deadline:
                raise AssertionError(f"load stalled at {self.result.ok} ok: {self.result}")
            await asyncio.sleep(0.02)

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if isinstance(self.address, str):
            return await asyncio.open_unix_connection(self.address)
        return await asyncio.open_connection(*self.address)

    async def _run(self) -> None:
        result = self.result
        close = self.mode == "close"
        while not self._stopping:
            opened = time.monotonic()
            try:
                reader, writer = await asyncio.wait_for(self._open(), self.timeout)
            except ConnectionRefusedError as exc:
                result.failures.append(Failure("refused", str(exc), opened, 0))
                await asyncio.sleep(0.01)
                continue
            except ConnectionResetError as exc:
                # The handshake completed in the listener's queue and the listener closed
                # before accepting it: the reset can arrive before the non-blocking connect()
                # is seen to finish (SO_ERROR), and is the same fresh reset as one on the
                # first request.
                result.failures.append(Failure("reset", repr(exc), opened, 0))
                await asyncio.sleep(0.01)
                continue
            except (OSError, TimeoutError) as exc:
                result.failures.append(Failure("connect", repr(exc), opened, 0))
                await asyncio.sleep(0.01)
                continue
            result.connections += 1
            answered = 0
            try:
                while not self._stopping:
                    writer.write(request(self.path, close=close))
                    try:
                        status, headers, _body = await asyncio.wait_for(
                            read_response(reader), self.timeout
                        )
                    except asyncio.IncompleteReadError as exc:
                        result.failures.append(
                            Failure("eof", f"{len(exc.partial)} bytes", opened, answered)
                        )
                        break
                    except (ConnectionResetError, BrokenPipeError) as exc:
                        result.failures.append(Failure("reset", repr(exc), opened, answered))
                        break
                    except TimeoutError:
                        result.failures.append(Failure("timeout", "", opened, answered))
                        break
                    if status != 200:
                        result.failures.append(Failure("status", str(status), opened, answered))
                    else:
                        result.ok += 1
                    answered += 1
                    result.servers[headers.get("x-pid", "?")] += 1
                    if close or headers.get("connection", "").lower() == "close":
                        result.closes += headers.get("connection", "").lower() == "close"
                        break
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
