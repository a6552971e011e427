"""``async with`` for the objects that close (``_asyncio/_closing.py``)."""

from __future__ import annotations

import asyncio

import pytest

from aioancillary._asyncio._closing import AsyncClosing


class Recorder(AsyncClosing):
    def __init__(self) -> None:
        self.calls: list[bool] = []

    async def _close_and_wait(self, cancelled: bool) -> None:
        self.calls.append(cancelled)


async def test_leaving_the_block_closes_and_says_whether_it_was_cancelled() -> None:
    obj = Recorder()
    async with obj as entered:
        assert entered is obj
    assert obj.calls == [False]
    with pytest.raises(KeyError):
        async with obj:
            raise KeyError("an error is not a cancellation")
    assert obj.calls == [False, False]

    async def cancelled_inside() -> None:
        async with obj:
            await asyncio.sleep(3600)

    task = asyncio.ensure_future(cancelled_inside())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert obj.calls == [False, False, True]


async def test_a_class_must_say_how_it_closes() -> None:
    with pytest.raises(NotImplementedError):
        async with AsyncClosing():
            pass
