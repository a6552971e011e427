"""Shared test machinery of tests/: async tests on every loop. The open-fd check around every
test (and every documentation sample) is in the repository's top-level ``conftest.py``."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator, Mapping

import pytest
from helpers import LOOP_FACTORIES, NO_UVLOOP, new_uvloop, uvloop


@pytest.fixture
def pipe_fds() -> Iterator[tuple[int, int]]:
    """A pipe ``(r, w)`` closed after the test."""
    r, w = os.pipe()
    yield r, w
    os.close(r)
    os.close(w)


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
