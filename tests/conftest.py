"""Shared test machinery: an open-fd check around every test; async tests on every loop."""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import Callable, Iterator, Mapping

import pytest
from helpers import LOOP_FACTORIES, NO_UVLOOP, new_uvloop, uvloop

if uvloop is not None:
    # The first uvloop loop of a process keeps libuv's internal fds open for good: create one
    # now so that the baseline taken before each test already includes them.
    uvloop.new_event_loop().close()


def open_fds() -> set[str]:
    return {f"{fd} -> {_target(fd)}" for fd in os.listdir("/proc/self/fd")}


def _target(fd: str) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


@pytest.fixture
def pipe_fds() -> Iterator[tuple[int, int]]:
    """A pipe ``(r, w)`` closed after the test."""
    r, w = os.pipe()
    yield r, w
    os.close(r)
    os.close(w)


@pytest.fixture(autouse=True)
def no_fd_leak(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test ends with exactly the open fds it started with."""
    before = open_fds()
    yield
    if request.node.get_closest_marker("fd_leak_ok"):
        return
    after = open_fds()
    if len(after) != len(before):
        # Objects awaiting the cycle collector may still hold fds: collect, then count again.
        # An fd closed only by GC warns (ResourceWarning is an error in this suite). A full
        # collection costs tens of ms, so it runs only when the count differs.
        gc.collect()
        after = open_fds()
    if len(after) != len(before):
        raise AssertionError(
            f"open fd count changed: {len(before)} -> {len(after)}; "
            f"new: {sorted(after - before)}, gone: {sorted(before - after)}"
        )


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Every async test runs on the default loop, on it in debug mode, and on uvloop.

    Debug mode (``loop.set_debug(True)``, as anyio's test plugin offers) makes asyncio check
    what it otherwise lets pass: calls from the wrong thread, coroutines never awaited, slow
    callbacks, resources left open with the traceback of where they were made.
    """
    return LOOP_FACTORIES


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without uvloop, the async tests' uvloop variants are skipped (``-ra`` says why)."""
    if uvloop is not None:
        return
    skip = pytest.mark.skip(reason=NO_UVLOOP)
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("_asyncio_loop_factory") is new_uvloop:
            item.add_marker(skip)
