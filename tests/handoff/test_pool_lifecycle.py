"""WorkerPool's life beyond start and stop: restart backoff per slot, reload, one worker more
or fewer, a main of your own instead of a handler, workers that fail to start.

Real worker processes; each test runs its own loop (asyncio, then uvloop) for the pool and
its workers, once: a worker process's start-up costs a second or more on a loaded machine.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import LOOP_NAMES, uvloop, wait_until, within
from hypothesis import given
from hypothesis import strategies as st

from aioancillary import WorkerPool, WorkerStartError
from aioancillary._handoff import _pool
from aioancillary._handoff._pool import RestartBackoff

HANDLER = "helpers.pool_handlers:handle"
MAIN = "helpers.pool_handlers:main"


def run(loop_name: str, test: Callable[[], Awaitable[None]]) -> None:
    factory = uvloop.new_event_loop if loop_name == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(asyncio.wait_for(test(), 120))


async def ask(port: int, text: str = "hello") -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(text.encode())
        return (await within(reader.readline(), 30)).decode().strip()
    finally:
        writer.close()
        await writer.wait_closed()


def listen(pool: WorkerPool) -> int:
    listener = socket.create_server(("127.0.0.1", 0), backlog=512)
    pool.acceptor.add_listener(listener)
    port: int = listener.getsockname()[1]
    return port


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# -- restart backoff (sans-I/O) -------------------------------------------------------------


def test_backoff_doubles_with_quick_exits_and_forgets_after_a_stable_run() -> None:
    backoff = RestartBackoff(first=0.1, most=10.0, stable=10.0)
    assert [backoff.delay(0.5) for _ in range(4)] == [0.1, 0.2, 0.4, 0.8]
    assert backoff.delay(3600.0) == 0.0  # ran stably: restarted at once, record cleared
    assert backoff.delay(0.5) == 0.1
    assert [backoff.delay(1.0) for _ in range(12)][-1] == 10.0  # capped


@given(st.lists(st.floats(min_value=0, max_value=100, allow_nan=False), max_size=60))
def test_backoff_depends_only_on_the_quick_exits_since_the_last_stable_run(
    lifetimes: list[float],
) -> None:
    backoff = RestartBackoff(first=0.1, most=10.0, stable=10.0)
    streak = 0
    for lived in lifetimes:
        delay = backoff.delay(lived)
        if lived >= 10.0:
            streak = 0
            assert delay == 0.0
        else:
            streak += 1
            assert delay == min(10.0, 0.1 * 2 ** (streak - 1))


@pytest.fixture
def fake_time(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The pool's clock and restart sleep, replaced: restart delays are recorded, not slept."""
    state: dict[str, Any] = {"now": 1000.0, "delays": []}

    async def sleep(delay: float) -> None:
        state["delays"].append(round(delay, 6))

    monkeypatch.setattr(_pool, "_clock", lambda: state["now"])
    monkeypatch.setattr(_pool, "_sleep", sleep)
    return state


@pytest.mark.parametrize("loop_name", LOOP_NAMES)
def test_pool_backs_off_per_slot_and_forgets_after_a_stable_run(
    loop_name: str, fake_time: dict[str, Any]
) -> None:
    async def test() -> None:
        async with WorkerPool(HANDLER, processes=2, loop=loop_name) as pool:  # type: ignore[arg-type]
            port = listen(pool)

            async def kill(slot: int) -> None:
                old = pool.pids
                os.kill(old[slot], signal.SIGKILL)
                await wait_until(  # the new one is registered with the acceptor
                    lambda: (
                        len(pool.pids) == 2
                        and pool.pids[slot] != old[slot]
                        and pool.pids[slot] in {w.pid for w in pool.acceptor.workers}
                    ),
                    timeout=60,
                )

            await kill(0)
            await kill(0)  # slot 0 dies young twice in a row: 0.1 s, then 0.2 s
            await kill(1)  # slot 1's first quick exit: 0.1 s, whatever slot 0 did
            fake_time["now"] += 60.0
            await kill(0)  # ran 60 s: restarted at once, its record cleared
            await kill(0)  # young again: back to the first delay
            assert fake_time["delays"] == [0.1, 0.2, 0.1, 0.1]
            assert pool.restarts == 5
            assert (await ask(port)).split()[1] == "hello"

    run(loop_name, test)


# -- reload, more and fewer workers ------------------------------------------------------------


@pytest.mark.parametrize("loop_name", LOOP_NAMES)
def test_reload_replaces_every_worker_without_refusing_or_losing_a_client(loop_name: str) -> None:
    async def test() -> None:
        async with WorkerPool(HANDLER, processes=2, loop=loop_name) as pool:  # type: ignore[arg-type]
            port = listen(pool)
            old = set(pool.pids)
            # A client an old worker holds across the reload.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"hold")
            assert (await within(reader.readline(), 30)).split()[0] == b"held"
            answers: list[str] = []
            # Answers to requests started once reload() had returned: a retiring worker is
            # never given a client, so only the new workers may answer these. (Which answers
            # arrive first is up to the scheduler: an old worker's answer to a request made
            # before may come after many new ones on a loaded machine.)
            after_reload: list[str] = []
            reloaded = False
            failures: list[BaseException] = []
            stop = asyncio.Event()

            async def load() -> None:
                while not stop.is_set():
                    late = reloaded
                    try:
                        answer = await ask(port)
                    except (OSError, TimeoutError) as exc:
                        failures.append(exc)
                        continue
                    answers.append(answer)
                    if late:
                        after_reload.append(answer)

            loaders = [asyncio.ensure_future(load()) for _ in range(4)]
            await wait_until(lambda: len(answers) > 20, timeout=30)
            await within(pool.reload(), 60)
            reloaded = True
            new = set(pool.pids)
            assert len(new) == 2
            assert not new & old
            assert sorted(pool.retiring) == sorted(old)  # one holds our client
            await wait_until(lambda: len(after_reload) > 20, timeout=30)
            assert {int(a.split()[0]) for a in after_reload} <= new
            writer.write(b"go")
            assert (await within(reader.readline(), 30)).strip() == b"released"
            writer.close()
            await writer.wait_closed()
            await wait_until(lambda: pool.retiring == [], timeout=30)
            assert all(gone(pid) for pid in old)
            stop.set()
            await asyncio.gather(*loaders)
            assert failures == []
            stats = pool.acceptor.stats()
            assert stats.lost == 0

    run(loop_name, test)


def test_a_failed_reload_keeps_the_old_workers(tmp_path: Path) -> None:
    broken = tmp_path / "broken"

    async def test() -> None:
        pool = WorkerPool(main=MAIN, args={"fail_if": str(broken)}, processes=2)
        async with pool:
            port = listen(pool)
            old = pool.pids
            broken.touch()  # the "new code" fails before it connects
            with pytest.raises(WorkerStartError, match="before it was ready") as info:
                await within(pool.reload(), 60)
            assert info.value.exit_status == 1
            assert pool.pids == old
            assert pool.retiring == []
            assert (await ask(port)).split()[1] == "hi"

    run("asyncio", test)


@pytest.mark.parametrize("loop_name", LOOP_NAMES)
def test_add_and_remove_one_worker(loop_name: str) -> None:
    async def grow_and_shrink() -> None:
        async with WorkerPool(main=MAIN, processes=1, loop=loop_name) as pool:  # type: ignore[arg-type]
            port = listen(pool)
            first = pool.pids[0]
            added = await within(pool.add_worker(), 60)
            assert pool.pids == [first, added]
            assert pool.size == 2
            slots = {(await ask(port)).split()[0] for _ in range(20)}
            assert slots == {"0", "1"}  # least-busy: both serve
            removed = await within(pool.remove_worker(), 10)
            assert removed == added
            assert pool.pids == [first]
            await wait_until(lambda: gone(added), timeout=30)
            with pytest.raises(ValueError, match="at least one"):
                await pool.remove_worker()
            again = await within(pool.add_worker(), 60)
            assert pool.pids == [first, again]  # slot 1 is free again

    run(loop_name, grow_and_shrink)


def test_main_gets_its_slot_index_and_the_pool_args() -> None:
    async def test() -> None:
        pool = WorkerPool(main=MAIN, args={"greeting": "bonjour"}, processes=2)
        async with pool:
            port = listen(pool)
            answers = {tuple((await ask(port)).split()[:2]) for _ in range(20)}
            assert answers == {("0", "bonjour"), ("1", "bonjour")}

    run("asyncio", test)


def test_a_main_that_cannot_be_imported_is_refused_at_once() -> None:
    with pytest.raises(ModuleNotFoundError):
        WorkerPool(main="no_such_module_here:main")
    with pytest.raises(TypeError, match="not both"):
        WorkerPool(HANDLER, main=MAIN)
    with pytest.raises(TypeError, match="JSON"):
        WorkerPool(main=MAIN, args={"x": object()})


def test_a_worker_that_fails_before_it_is_ready_fails_start(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.touch()

    async def test() -> None:
        pool = WorkerPool(main=MAIN, args={"fail_if": str(broken)}, processes=2)
        with pytest.raises(WorkerStartError, match="before it was ready") as info:
            async with pool:
                pass
        assert info.value.exit_status == 1
        assert pool.pids == []

    run("asyncio", test)


def test_a_worker_that_never_gets_ready_is_stopped(tmp_path: Path) -> None:
    async def test() -> None:
        pool = WorkerPool(main=MAIN, args={"hang": True}, processes=1, ready_timeout=1.0)
        with pytest.raises(WorkerStartError, match="not ready after 1 s") as info:
            await pool.start()
        assert info.value.exit_status is None
        await pool.shutdown(timeout=0)

    run("asyncio", test)
