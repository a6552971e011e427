"""The repository's own test machinery (``conftest.py``) catches what it is there to catch: an fd
swapped for another under the same number, and a skip nobody listed. Each case runs a planted
test file in a child pytest, beside a copy of the real ``conftest.py``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SWAP = """
import os

r, w = os.pipe()  # opened at import: part of every test's starting fd table


def test_swaps_one_fd_for_another():
    global r
    os.close(r)  # an fd the test did not open...
    r = os.open(os.devnull, os.O_RDONLY)  # ...and one it did: same count, even the same number
"""

BALANCED = """
import os


def test_opens_and_closes_its_own():
    fd = os.open(os.devnull, os.O_RDONLY)
    os.close(fd)
"""

SKIPS = """
import pytest


def test_expected():
    pytest.skip("a reason this job expects")


@pytest.mark.skipif(True, reason="nobody expected this one")
def test_unexpected():
    pass


@pytest.mark.xfail(reason="an xfail is not a skip")
def test_xfail():
    raise AssertionError
"""


def run_planted(tmp_path: Path, source: str, *args: str) -> subprocess.CompletedProcess[str]:
    shutil.copy(ROOT / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_planted.py").write_text(source)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        # CI's own --expected-skips (PYTEST_ADDOPTS) is for the suite, not the planted runs.
        env={k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"},
    )


def test_an_fd_swapped_under_the_same_number_fails(tmp_path: Path) -> None:
    result = run_planted(tmp_path, SWAP)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "the test changed the process's open fds: fd " in result.stdout
    assert "is another file: was OpenFile(target='pipe:[" in result.stdout
    assert "now OpenFile(target='/dev/null'" in result.stdout


def test_an_fd_opened_and_closed_by_the_test_passes(tmp_path: Path) -> None:
    result = run_planted(tmp_path, BALANCED)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("listed", ["a reason this job expects", "a reason this job exp*"])
def test_a_skip_not_in_the_expected_list_fails_the_run(tmp_path: Path, listed: str) -> None:
    (tmp_path / "skips.txt").write_text(f"# the job's expected skips\n{listed}\n")
    result = run_planted(tmp_path, SKIPS, "--expected-skips=skips.txt")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "unexpected skips" in result.stdout
    assert "test_planted.py::test_unexpected: nobody expected this one" in result.stdout
    assert "test_expected" not in result.stdout.split("unexpected skips")[1]
    assert "test_xfail" not in result.stdout.split("unexpected skips")[1]


def test_skips_all_listed_pass(tmp_path: Path) -> None:
    (tmp_path / "skips.txt").write_text("a reason this job expects\nnobody expected*\n")
    result = run_planted(tmp_path, SKIPS, "--expected-skips=skips.txt")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "unexpected skips" not in result.stdout


def test_without_an_expected_list_skips_only_show(tmp_path: Path) -> None:
    result = run_planted(tmp_path, SKIPS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SKIPPED" in result.stdout
