"""A reload between two ConnectionServers refuses no client (both in this process, on every
loop; the examples run the same across processes: tests/project/test_examples.py)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

from helpers import TIMEOUT, wait_until, within

from aioancillary import ConnectionServer, start_generation

CLIENTS = 4


def greeter(name: str) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        await asyncio.sleep(0.001)  # in flight across the switch
        writer.write(f"{name}\n".encode())

    return greet


async def client_loop(
    port: int, answers: list[str], failures: list[str], stop: asyncio.Event
) -> None:
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError as exc:
            failures.append(f"refused: {exc!r}")
            continue
        try:
            writer.write(b"hi\n")
            answer = (await within(reader.readline())).decode().strip()
            (answers if answer else failures).append(answer or "closed without an answer")
        except OSError as exc:
            failures.append(f"dropped: {exc!r}")
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def test_a_reload_between_two_connection_servers_refuses_no_client(tmp_path: Path) -> None:
    path = str(tmp_path / "handoff.sock")
    first = await start_generation(path, systemd=False)
    web = first.take_socket(
        "web", create=lambda: socket.create_server(("127.0.0.1", 0), backlog=512)
    )
    port = web.getsockname()[1]
    old = ConnectionServer(greeter("old"))
    old.add_listener(web)
    await first.ready()

    answers: list[str] = []
    failures: list[str] = []
    stop = asyncio.Event()
    clients = [
        asyncio.ensure_future(client_loop(port, answers, failures, stop)) for _ in range(CLIENTS)
    ]
    second = None
    inherited = None
    new = None
    try:
        await wait_until(lambda: len(answers) >= 20, 3 * TIMEOUT)
        second = await start_generation(path)
        inherited = second.take_socket("web")
        new = ConnectionServer(greeter("new"))
        new.add_listener(inherited)
        await second.ready()
        await within(first.handed_over())
        cut = await old.drain(timeout=TIMEOUT)  # the listener stays open for `new`
        web.close()
        await first.close()
        switched = len(answers)
        await wait_until(lambda: len(answers) >= switched + 20, 3 * TIMEOUT)
    finally:
        stop.set()
        await within(asyncio.gather(*clients), 3 * TIMEOUT)
        if new is not None:
            await new.drain(timeout=TIMEOUT)
        if inherited is not None:
            inherited.close()
        if second is not None:
            await second.close()
        if web.fileno() >= 0:  # failed before the switch
            old.close()
            web.close()
            await first.close()
    assert failures == []
    assert cut == 0
    assert {"old", "new"} <= set(answers)
    # After the drain only `new` serves (each client may still have been reading one answer).
    assert set(answers[switched + CLIENTS :]) == {"new"}
    stats = old.stats()
    assert stats.accepted == stats.finished == answers.count("old")
