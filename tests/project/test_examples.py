"""The runnable examples and the demo finish by themselves, exit 0 and say they succeeded."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"

CASES = {
    "acceptor_worker": (
        [str(EXAMPLES / "acceptor_worker.py")],
        "OK: all 6 clients were answered by the 2 worker processes",
    ),
    "prefork_pool": (
        [str(EXAMPLES / "prefork_pool.py")],
        "OK: 200 visitors answered by",
    ),
    "zero_downtime_reload": (
        [str(EXAMPLES / "zero_downtime_reload.py")],
        "none refused or dropped",
    ),
    "uvloop_daemon": (
        [str(EXAMPLES / "uvloop_daemon.py")],
        "OK: 18 visitors counted 1 to 18 by two daemon processes (socket-activated, then reloaded",
    ),
    "demo": (
        ["-m", "aioancillary", "demo"],
        "neither process leaked a file descriptor",
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_example_runs_and_succeeds(name: str) -> None:
    args, key_line = CASES[name]
    result = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert key_line in result.stdout, output
    assert "Traceback" not in output, output


def test_every_example_is_tested() -> None:
    scripts = {path.stem for path in EXAMPLES.glob("*.py")}
    assert scripts <= set(CASES), f"examples without a test: {sorted(scripts - set(CASES))}"
