"""Test machinery for the whole repository: the open-fd check around every test, the check of
skips against an expected list, and the documentation samples collected as tests.

Every test ends with exactly the fds it started with: the same numbers, each still the same open
file (compared by device and inode, and by what ``/proc/self/fd`` says it is), so a test that
opens one fd and closes an unrelated one fails as surely as one that leaks.

``--expected-skips=FILE`` fails the run when a test is skipped for a reason FILE does not list
(one ``fnmatch`` pattern per line, matched against the skip reason; ``#`` starts a comment). CI
gives each of its jobs such a file (``.ci/skips/``): a job that silently tests less, for a
missing tool, a lower fd limit or no root, fails instead of passing.

Every ```python block of README.md and docs/**/*.md runs as a test (sybil), each in a fresh
namespace, under the same open-fd check as the suite: a sample that leaks an fd fails. A block
preceded by ``<!-- skip: next -->`` is skipped; the page says why next to it.
"""

from __future__ import annotations

import fnmatch
import gc
import os
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

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


class OpenFile(NamedTuple):
    """What an fd number refers to: ``/proc/self/fd``'s link text, and the file's identity."""

    target: str
    dev: int
    ino: int


def open_fds() -> dict[int, OpenFile]:
    """Every open fd of this process, with what it refers to."""
    fds: dict[int, OpenFile] = {}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
            st = os.fstat(fd)
        except OSError:
            continue  # the listing's own directory fd, closed once listdir returned
        fds[fd] = OpenFile(target, st.st_dev, st.st_ino)
    return fds


def fd_changes(before: dict[int, OpenFile], after: dict[int, OpenFile]) -> str:
    """What differs between two fd tables, or ``""``: fds opened, closed, or now another file."""
    changes = []
    for fd in sorted(before.keys() | after.keys()):
        old, new = before.get(fd), after.get(fd)
        if old == new:
            continue
        if old is None:
            changes.append(f"fd {fd} opened: {new}")
        elif new is None:
            changes.append(f"fd {fd} closed: {old}")
        else:
            changes.append(f"fd {fd} is another file: was {old}, now {new}")
    return "; ".join(changes)


@pytest.fixture(autouse=True)
def no_fd_leak(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test ends with exactly the open fds it started with, each the same open file."""
    before = open_fds()
    yield
    if request.node.get_closest_marker("fd_leak_ok"):
        return
    if open_fds() != before:
        # Objects awaiting the cycle collector may still hold fds: collect, then look again.
        # An fd closed only by GC warns (ResourceWarning is an error in this suite). A full
        # collection costs tens of ms, so it runs only when something differs.
        gc.collect()
    changes = fd_changes(before, open_fds())
    if changes:
        raise AssertionError(f"the test changed the process's open fds: {changes}")


# -- skips against an expected list ----------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--expected-skips",
        metavar="FILE",
        default=None,
        help="fail the run when a test is skipped for a reason that no line of FILE matches "
        "(fnmatch patterns, one a line, # comments)",
    )


#: (node id, reason) of every skip of this run.
_skipped: list[tuple[str, str]] = []


def _skip_reason(report: pytest.CollectReport | pytest.TestReport) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


def _record_skip(report: pytest.CollectReport | pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):  # an xfail reports as skipped too
        _skipped.append((report.nodeid, _skip_reason(report)))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _record_skip(report)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    _record_skip(report)


def _expected_patterns(path: str) -> list[str]:
    lines = Path(path).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def unexpected_skips(config: pytest.Config) -> list[tuple[str, str]]:
    """The skips of this run that no pattern of ``--expected-skips`` explains."""
    path = config.getoption("--expected-skips")
    if path is None:
        return []
    patterns = _expected_patterns(path)
    return [
        (nodeid, reason)
        for nodeid, reason in _skipped
        if not any(fnmatch.fnmatchcase(reason, pattern) for pattern in patterns)
    ]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if unexpected_skips(session.config) and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    config = terminalreporter.config
    unexpected = unexpected_skips(config)
    if not unexpected:
        return
    terminalreporter.section("unexpected skips", red=True)
    for nodeid, reason in unexpected:
        terminalreporter.line(f"{nodeid}: {reason}", red=True)
    terminalreporter.line(
        f"{len(unexpected)} test(s) skipped for a reason not listed in "
        f"{config.getoption('--expected-skips')}: make the skip unnecessary on this job, or "
        "list the reason there if this job cannot run the test.",
        red=True,
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
