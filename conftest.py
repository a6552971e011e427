"""Test machinery for the whole repository: the open-fd check around every test, and the
documentation samples collected as tests.

Every ```python block of README.md and docs/**/*.md runs as a test (sybil), each in a fresh
namespace, under the same open-fd check as the suite: a sample that leaks an fd fails. A block
preceded by ``<!-- skip: next -->`` is skipped; the page says why next to it.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sybil import Example, Sybil
from sybil.evaluators.python import PythonEvaluator
from sybil.parsers.markdown import CodeBlockParser, SkipParser

try:
    import uvloop
except ImportError:
    uvloop = None  # type: ignore[assignment]

if uvloop is not None:
    # The first uvloop loop of a process keeps libuv's internal fds open for good: create one
    # now so that the baseline taken before each test already includes them.
    uvloop.new_event_loop().close()

ROOT = Path(__file__).resolve().parent

#: Pages whose samples are not run, each with the reason (none today).
NOT_YET_RUN: set[str] = set()


def open_fds() -> set[str]:
    return {f"{fd} -> {_target(fd)}" for fd in os.listdir("/proc/self/fd")}


def _target(fd: str) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


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


class _FreshNamespace(PythonEvaluator):
    """Run each sample on its own, as a reader who copies it would: no names left over from
    the samples above it on the page."""

    def __call__(self, example: Example) -> None:
        example.namespace.clear()
        example.namespace["__name__"] = "__docs_sample__"
        super().__call__(example)
        example.namespace.clear()  # what a sample made is released before the fd check


_collect_samples = Sybil(
    parsers=[CodeBlockParser("python", _FreshNamespace()), SkipParser()],
    patterns=["*.md"],
    path=str(ROOT),
).pytest()


def _has_samples(file_path: Path) -> bool:
    try:
        relative = file_path.relative_to(ROOT).as_posix()
    except ValueError:
        return False
    if relative in NOT_YET_RUN or file_path.suffix != ".md":
        return False
    return relative == "README.md" or relative.startswith("docs/")


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    """README.md and docs/**/*.md: their ```python blocks are tests."""
    if not _has_samples(file_path):
        return None
    collector: pytest.Collector | None = _collect_samples(file_path, parent)
    return collector
