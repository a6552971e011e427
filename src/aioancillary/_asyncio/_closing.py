"""``async with`` for the objects that close: one mixin instead of a copy in every class."""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Self

__all__ = ["AsyncClosing"]


class AsyncClosing:
    """``async with obj:`` gives ``obj``; leaving the block closes it and waits until it is.

    A class using it defines ``_close_and_wait(cancelled)``: ``cancelled`` is true when the
    block is left by a cancellation, a reason to stop at once (abort) rather than wait for a
    peer that may never read.
    """

    __slots__ = ()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._close_and_wait(
            exc_type is not None and issubclass(exc_type, asyncio.CancelledError)
        )

    async def _close_and_wait(self, cancelled: bool) -> None:
        """Close, then wait until closed; ``cancelled``: the block was left by a cancellation."""
        raise NotImplementedError
